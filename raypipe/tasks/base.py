"""The Task interface: everything a round needs from a task, and nothing else.

A task owns what differs between the embedded synthetic task, GSM8K, MATH and a user's own dataset: its splits
(typed `Problem` records), the prompt for the policy's tokenizer, grading a completion, cutting a completion into
steps, and optional exact capabilities (a first-wrong-step checker, a corrector, a question evolver). Stages talk
to a `Task`; none of them names a task kind. A stage that needs a capability the task lacks calls `require`,
which is a clear config error instead of a silent fallback.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from transformers import PreTrainedTokenizerBase

from raypipe.config import ConfigError, TaskConfig
from raypipe.data.steps import StepSplitter
from raypipe.grading import GradeResult, grade
from raypipe.tasks.prompts import build_prompt, plain_prompt

if TYPE_CHECKING:
    from raypipe.lema.format import Correction

CAPABILITIES = {
    "exact_checker": "an exact first-wrong-step checker",
    "exact_corrector": "an exact corrector",
    "question_evolver": "a question evolver",
}
"""Optional task capabilities, with the words error messages use for them."""


@dataclass(frozen=True)
class Problem:
    """One question of a split. `id` is its position in the split: the `qid` of every row made from it."""

    id: int
    question: str
    gold: str
    """The gold final answer, as the task's grader compares it."""
    solution: str | None = None
    """The worked solution (a training target), for the worked split only: pool questions never carry one."""
    source: str | None = None
    """Where the row came from (`file:row` for a dataset row), for provenance."""


@dataclass
class Splits:
    """A task's four splits and the input rows it set aside (shape: `raypipe.data.rows.rejected_row`)."""

    worked: list[Problem]
    """Problems with worked solutions: round 0's SFT, the `sft` / `rft` / `aft` / `lema` CoT data, the control."""
    pool: list[Problem]
    """Answer-only questions the methods sample on."""
    dev: list[Problem]
    """Held out: SFT's stopping rule and any selection."""
    test: list[Problem]
    """Held out: the reported accuracy."""
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("worked", "pool", "dev", "test")}


class Task:
    """Base class: prompts, grading and steps from the config; subclasses provide the splits and capabilities."""

    answer_kind: str = "synthetic"
    capabilities: frozenset[str] = frozenset()

    def __init__(self, cfg: TaskConfig) -> None:
        self.cfg = cfg
        self.steps = StepSplitter(cfg.step_delimiter)

    @cached_property
    def splits(self) -> Splits:
        return self.load_splits()

    def load_splits(self) -> Splits:
        raise NotImplementedError

    # ---- prompts -----------------------------------------------------------------------------------------

    def prompt(self, tokenizer: PreTrainedTokenizerBase, question: str) -> str:
        """The prompt the policy sees for `question`: its chat template when it has one, else the plain one."""
        return build_prompt(tokenizer, question, self.cfg.system_prompt, self.cfg.instruction)

    def prompt_ids(self, tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
        return tokenizer(self.prompt(tokenizer, question), add_special_tokens=False).input_ids

    def tokenizer_corpus(self, extra: list[str]) -> list[str]:
        """Text the tiny model's tokenizer is trained on: plain prompts with the worked solutions, the pool's
        prompts, and `extra` formats (['lema']: correction examples)."""
        splits = self.splits
        corpus = [plain_prompt(p.question, self.cfg.instruction) + (p.solution or "") for p in splits.worked]
        corpus += [plain_prompt(p.question, self.cfg.instruction) for p in splits.pool]
        if "lema" in extra:
            corpus += self.correction_corpus(splits.worked[:LEMA_CORPUS_PROBLEMS])
        return corpus

    def correction_corpus(self, problems: list[Problem]) -> list[str]:
        """Correction examples built from worked solutions (the format's words matter, not their truth)."""
        from raypipe.lema.format import Correction, correction_input, numbered_steps

        texts = []
        for p in problems:
            steps = numbered_steps(p.solution or "")
            if steps:
                fix = Correction(len(steps), "This step does not follow from the one before.", (steps[-1],))
                texts.append(correction_input(p.question, steps) + fix.text())
        return texts

    # ---- grading and steps -------------------------------------------------------------------------------

    def grade(self, completion: str, gold: str) -> GradeResult:
        return grade(completion, gold, self.answer_kind)

    def is_correct(self, completion: str, gold: str) -> bool:
        return self.grade(completion, gold).correct

    def step_ends(self, ids: list[int], decode: Callable[[list[int]], str]) -> list[int]:
        """Exclusive token ends of each step of a completion's token ids."""
        return self.steps.token_ends([decode([t]) for t in ids])

    # ---- optional capabilities ---------------------------------------------------------------------------

    def supports(self, capability: str) -> bool:
        return capability in self.capabilities

    def require(self, capability: str, needed_by: str, instead: str = "") -> None:
        """A ConfigError unless the task has `capability`: `needed_by` names the setting that needs it."""
        if capability not in self.capabilities:
            hint = f"; {instead}" if instead else ""
            raise ConfigError(f"{needed_by} needs {CAPABILITIES[capability]}, which the {self.name} task does not "
                              f"have{hint}")

    @property
    def name(self) -> str:
        return self.cfg.source

    def first_wrong_step(self, problem: Problem, completion: str) -> int | None:
        """exact_checker: the 1-based first wrong step of `completion`, None when every step is right."""
        raise NotImplementedError

    def exact_correction(self, problem: Problem, completion: str) -> Correction | None:
        """exact_corrector: the correction a perfect corrector writes; None when there is nothing to correct."""
        raise NotImplementedError

    def evolve(self, problem: Problem, rng: random.Random, new_id: int) -> Problem:
        """question_evolver: a related new question (its gold answer known to the task, not to the pipeline)."""
        raise NotImplementedError


LEMA_CORPUS_PROBLEMS = 500
"""Correction examples added to the tiny tokenizer's corpus for `model.extra_corpus: [lema]`."""
