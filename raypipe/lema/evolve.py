"""LEMA's optional correction-centric question evolution: new questions grown from the questions that appear in
the kept corrections (the ones the policy got wrong and a corrector could fix), pseudo-labelled by a 3-sample
majority vote of the policy, then fed through the same mistake collection and correction.

The published evolver is GPT-4 prompted as a math teacher; here it is a template for the embedded task (same
operations in the same order, new operands: a related but different question, whose true steps the exact
corrector knows). A model evolver for other tasks is not built yet.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from raypipe.config import RunConfig, TaskConfig
from raypipe.data.synthetic import ArithmeticProblem, make_problem
from raypipe.engines import SamplingSpec, TextGenerator
from raypipe.grading import extract_answer, is_equivalent
from raypipe.lema.correct import correct_mistakes, policy_mistakes
from raypipe.tasks import Problem, Task

LABEL_SAMPLES = 3
"""Policy answers per evolved question; the majority is its pseudo-label (no majority: dropped)."""


def seed_questions(kept: Sequence[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """`n` seeds drawn with replacement from the kept corrections: a question corrected often is drawn often."""
    return [rng.choice(kept) for _ in range(n)] if kept else []


def template_evolve(seed: ArithmeticProblem, rng: random.Random, task: TaskConfig) -> ArithmeticProblem:
    """A problem with the seed's operations in the same order and fresh operands (the embedded task's evolver)."""
    ops = re.findall(r"\b(Add|Subtract|Multiply by)\b", seed.question)
    symbols = [{"Add": "+", "Subtract": "-", "Multiply by": "*"}[op] for op in ops]
    for _ in range(100):
        candidate = make_problem(rng, TaskConfig(**{**vars(task), "num_steps_min": len(ops),
                                                   "num_steps_max": len(ops), "operations": sorted(set(symbols))}))
        written = [line.split()[3] for line in candidate.steps]
        if written == symbols and candidate.question != seed.question:
            return candidate
    return candidate  # a rare fallback: same length, the operations the task allows


def majority(answers: Sequence[str | None]) -> str | None:
    """The answer given by most samples; None when every sample disagrees (or none has an answer)."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    answer, count = counts.most_common(1)[0]
    return answer if count > 1 or len(answers) == 1 else None


Sampler = Callable[[list[tuple[int, Problem]], int], list[dict[str, Any]]]
"""Sample `n` chains per problem from the round's policy: rows with `qid` and `completion`."""


def evolve_and_correct(cfg: RunConfig, task: Task, kept: Sequence[dict[str, Any]], problems: dict[int, Problem],
                       sample: Sampler, corrector: TextGenerator | None, spec: SamplingSpec,
                       chat: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Evolve `lema.evolve_questions` questions from the kept corrections, pseudo-label them, collect the policy's
    mistakes on them and correct those; returns the correction rows (source 'evolved') and the statistics."""
    kind, settings = task.answer_kind, cfg.lema
    rng = random.Random(f"{cfg.seed}/evolve/{sorted(k['qid'] for k in kept)}")  # new seeds, new questions
    seeds = seed_questions(kept, settings.evolve_questions, rng)
    first = max(problems, default=-1) + 1
    new = {first + i: task.evolve(problems[s["qid"]], rng, first + i) for i, s in enumerate(seeds)}
    answers: dict[int, list[str | None]] = {q: [] for q in new}
    for row in sample(list(new.items()), LABEL_SAMPLES):
        answers[row["qid"]].append(extract_answer(row["completion"], kind))
    labels = {q: label for q, votes in answers.items() if (label := majority(votes)) is not None}
    chains = sample([(q, new[q]) for q in labels], cfg.sampling.samples_per_question) if labels else []
    graded = [{**row, "question": new[row["qid"]].question, "gold": labels[row["qid"]],
               "correct": task.is_correct(row["completion"], labels[row["qid"]])} for row in chains]
    mistakes = [{**m, "source": "evolved"} for m in policy_mistakes(graded, settings.max_mistakes_per_question)]
    rows = correct_mistakes(mistakes, task, new, corrector, spec, chat)
    right = sum(is_equivalent(label, new[q].gold, kind) for q, label in labels.items())
    return rows, {"evolved_questions": len(new), "pseudo_labelled": len(labels),
                  "pseudo_label_accuracy": right / len(labels) if labels else None,
                  "evolved_mistakes": len(rows), "evolved_kept": sum(r["status"] == "kept" for r in rows)}
