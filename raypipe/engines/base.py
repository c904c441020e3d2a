"""The generator interface: every engine (vLLM, transformers) samples the same way behind it.

Prompts are token ids, never text: continuing a chain of thought from a step boundary must reuse the exact
ids the policy produced, since re-tokenising text can merge tokens across the boundary.
"""

from __future__ import annotations

import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. temperature 0 means greedy."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    """Stop strings (e.g. the step boundary "\\n"); the matched string is kept in the output."""
    seed: int | None = None
    """Base seed of a call (None: unseeded). `generate_rows` gives prompt i of the call the seed
    `derive_seed(seed, i)`, so a rerun with the same seed draws the same samples however the rows are batched."""


@dataclass(frozen=True)
class Completion:
    """One sampled continuation of a prompt."""

    token_ids: list[int]
    """Generated ids, the stop string's tokens included, the end-of-sequence token excluded."""
    text: str
    """Decoded `token_ids` (special tokens skipped)."""
    finish_reason: FinishReason
    """'eos': the answer ended; 'stop': a stop string ended it (a step boundary); 'length': cut by max_tokens."""


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts (run seed, round, stage, row index ...): stable across processes, unlike
    `hash`, and different for every combination, so no two prompts of a run share a random stream."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


class Generator(ABC):
    """A loaded policy that samples continuations of token-id prompts."""

    @abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """`spec.n` completions for each prompt, in prompt order; `seeds`: one per prompt (else `spec.seed`)."""

    @abstractmethod
    def load_weights(self, model_dir: str) -> None:
        """Swap in new weights of the same architecture from an HF directory (the next round's policy)."""

    def sleep(self) -> None:
        """Free the accelerator memory the engine holds (weights and cache) until `wake_up`; the weights must be
        loaded again after waking. Only engines that can share a GPU with training implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot sleep (engine.colocate needs backend=vllm)")

    def wake_up(self) -> None:
        """Take back the memory `sleep` freed."""
        raise NotImplementedError(f"{type(self).__name__} cannot sleep (engine.colocate needs backend=vllm)")

    def close(self) -> None:
        """Release the engine's memory; the default does nothing."""
