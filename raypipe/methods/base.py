"""What every method's training-set builder receives: the round's data, as plain rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raypipe.config import RunConfig


@dataclass
class BuildInputs:
    """The inputs of a round's `build` stage."""

    cfg: RunConfig
    round: int
    worked: list[dict[str, Any]]
    """SFT rows of the worked solutions (`input_ids`, `loss_mask`): the small set with reference chains."""
    graded: list[dict[str, Any]] = field(default_factory=list)
    """The round's graded samples of the answer-only pool (empty for methods that do not sample)."""
    branched: list[dict[str, Any]] = field(default_factory=list)
    """Step-DPO only: wrong chains with their localised first wrong step and correct continuations."""
    corrections: list[dict[str, Any]] = field(default_factory=list)
    """LEMA only: the round's mistakes with their corrections and status (raypipe/lema/correct.py)."""
    eos_id: int = 0
    decode: Callable[[list[int]], str] = str
    encode: Callable[[str], list[int]] = list
    step_ends: Callable[[list[int]], list[int]] = lambda ids: [len(ids)] if ids else []
    """Exclusive token ends of each step of a completion's ids, as the task cuts steps."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Added to every row: round, method, localiser, model version."""
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    """Filled by the builder: each row of the round's data it could not use, as {qid, source, reason, error}. The
    build stage writes them to rejected.jsonl and counts them by reason in its manifest (none left out silently)."""
