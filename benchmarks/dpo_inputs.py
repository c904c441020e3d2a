"""The DPO benchmark's inputs, shared by every contender: step-level preference pairs on the embedded task, the
tiny model they train, and the settings all contenders use."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raypipe.config import ModelConfig, TaskConfig
from raypipe.data.synthetic import ArithmeticProblem, load_splits
from raypipe.data.tiny_model import save_tiny_model
from raypipe.update_config import OptimConfig

SHIFTS = (1, 2, 10, 100)
"""How far a rejected step's result is off (either sign), as in the feasibility study's synthesised pairs."""


@dataclass(frozen=True)
class Pair:
    prompt_ids: list[int]
    """Question, pre-fill and the correct steps before the compared one."""
    chosen_ids: list[int]
    rejected_ids: list[int]

    def row(self) -> dict[str, list[int]]:
        """raypipe's preference row (as Step-DPO's build stage writes it): ids with the step masked in."""
        prompt = [0] * len(self.prompt_ids)
        return {"chosen_ids": self.prompt_ids + self.chosen_ids, "chosen_mask": prompt + [1] * len(self.chosen_ids),
                "rejected_ids": self.prompt_ids + self.rejected_ids,
                "rejected_mask": prompt + [1] * len(self.rejected_ids)}


@dataclass(frozen=True)
class Settings:
    """What every contender shares."""

    batch_size: int
    steps: int
    warmup: int
    threads: int
    max_length: int = 160
    beta: float = 0.1
    lr: float = 1e-5
    """The benchmark's (a throughput figure needs no learning); the tests raise it to see the loss fall."""

    @property
    def optim(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, warmup_steps=5, batch_size=self.batch_size, min_lr_ratio=0.0)


def step_pairs(problems: list[ArithmeticProblem], encode: Callable[[str], list[int]], n: int, seed: int = 0) -> list[Pair]:
    """One pair per problem: a random step k of its true solution against the same line with a wrong result."""
    rng = random.Random(seed)
    pairs = []
    for problem in problems[:n]:
        k = rng.randrange(len(problem.steps))
        head, result = problem.steps[k].rsplit(" = ", 1)
        shift = rng.choice(SHIFTS)
        wrong = int(result) + (shift if int(result) < shift or rng.random() < 0.5 else -shift)
        prefix = "".join(f"{s}\n" for s in problem.steps[:k])
        pairs.append(Pair(encode(problem.prompt + prefix), encode(problem.steps[k] + "\n"),
                          encode(f"{head} = {wrong}\n")))
    if len(pairs) < n:
        raise ValueError(f"asked for {n} pairs but the task has {len(problems)} pool questions")
    return pairs


def build_inputs(root: Path, n_pairs: int) -> tuple[Path, list[Pair]]:
    """The tiny model (same corpus and tokenizer as the pipeline's) and pairs on the answer-only pool questions."""
    from transformers import AutoTokenizer

    splits = load_splits(TaskConfig())
    corpus = [p.prompt + p.solution for p in splits["sft"]] + [p.prompt for p in splits["pool"]]
    model_dir = save_tiny_model(ModelConfig(), corpus, root / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model_dir, step_pairs(splits["pool"], lambda s: tok(s, add_special_tokens=False)["input_ids"], n_pairs)
