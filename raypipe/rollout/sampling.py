"""Error collection: sample N chains per question, grade them, and pick the wrong chains to branch from."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from raypipe.config import SamplingConfig
from raypipe.engines.base import SamplingSpec
from raypipe.rollout.branching import WrongChain
from raypipe.rollout.generation import EnginePool, generate_rows
from raypipe.tasks import Problem, Task


def prompt_rows(problems: Sequence[tuple[int, Problem]], tokenizer: PreTrainedTokenizerBase,
                task: Task) -> list[dict[str, Any]]:
    """One generation row per question: its id, text, gold answer and prompt token ids (the task's prompt)."""
    return [{"qid": qid, "question": p.question, "gold": p.gold, "prompt_ids": task.prompt_ids(tokenizer, p.question)}
            for qid, p in problems]


def sample_chains(pool: EnginePool, model_dir: str, rows: Sequence[dict[str, Any]], cfg: SamplingConfig,
                  seed: int | None) -> list[dict[str, Any]]:
    """`cfg.samples_per_question` chains per row from `model_dir`; the same seed draws the same chains (a resumed
    stage)."""
    spec = SamplingSpec(n=cfg.samples_per_question, temperature=cfg.temperature, top_p=cfg.top_p,
                        max_tokens=cfg.max_new_tokens, seed=seed)
    return generate_rows(pool, model_dir, rows, spec)


def grade_samples(samples: Sequence[dict[str, Any]], problems: dict[int, Problem], task: Task) -> list[dict[str, Any]]:
    """Add the task's verdict and, where the task has an exact checker, the exact first wrong step of each sample."""
    graded = []
    exact_checker = task.supports("exact_checker")
    for row in samples:
        verdict = task.grade(row["completion"], row["gold"])
        exact = task.first_wrong_step(problems[row["qid"]], row["completion"]) if exact_checker else None
        graded.append({**row, "predicted": verdict.predicted, "correct": verdict.correct,
                       "grade_reason": verdict.reason, "exact_first_wrong": exact})
    return graded


def wrong_chains(graded: Sequence[dict[str, Any]], step_ends: Callable[[list[int]], list[int]],
                 max_per_question: int) -> list[WrongChain]:
    """Distinct wrong chains (at most `max_per_question` each), with their correct siblings attached."""
    by_question: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in graded:
        by_question[row["qid"]].append(row)
    chains = []
    for qid, rows in by_question.items():
        successes = [r["completion_ids"] for r in rows if r["correct"]]
        seen: set[str] = set()
        for row in rows:
            if row["correct"] or row["completion"] in seen or len(seen) >= max_per_question:
                continue
            seen.add(row["completion"])
            ends = step_ends(list(row["completion_ids"]))
            chains.append(WrongChain(
                qid=qid, sample_idx=row["sample_idx"], question=row["question"], gold=row["gold"],
                prompt_ids=row["prompt_ids"], completion_ids=row["completion_ids"], completion=row["completion"],
                step_ends=ends, sibling_successes=successes, num_siblings=len(rows),
                exact_first_wrong=row["exact_first_wrong"]))
    return chains
