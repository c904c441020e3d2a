"""The embedded default as a Task: chained arithmetic problems generated here, with exact capabilities.

Every question states its own true steps (`raypipe.data.synthetic.parse_question`), so this task can check the
first wrong step of any chain exactly, write the correction a perfect corrector would, and evolve new questions.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

from raypipe.data.synthetic import ArithmeticProblem, first_wrong_step, load_splits, parse_question
from raypipe.tasks.base import Problem, Splits, Task

if TYPE_CHECKING:
    from raypipe.lema.format import Correction


class SyntheticTask(Task):
    answer_kind = "synthetic"
    capabilities = frozenset({"exact_checker", "exact_corrector", "question_evolver"})

    def load_splits(self) -> Splits:
        generated = load_splits(self.cfg)
        worked, pool, dev, test = ([_record(i, p, worked=name == "sft") for i, p in enumerate(generated[name])]
                                   for name in ("sft", "pool", "dev", "test"))
        return Splits(worked=worked, pool=pool, dev=dev, test=test)

    def correction_corpus(self, problems: list[Problem]) -> list[str]:
        from raypipe.lema.exact import format_corpus

        return format_corpus([_arithmetic(p) for p in problems])

    def first_wrong_step(self, problem: Problem, completion: str) -> int | None:
        return first_wrong_step(_arithmetic(problem), completion)

    def exact_correction(self, problem: Problem, completion: str) -> Correction | None:
        from raypipe.lema.exact import exact_correction

        return exact_correction(_arithmetic(problem), completion)

    def evolve(self, problem: Problem, rng: random.Random, new_id: int) -> Problem:
        from raypipe.lema.evolve import template_evolve

        return _record(new_id, template_evolve(_arithmetic(problem), rng, self.cfg), worked=False)


def _record(i: int, p: ArithmeticProblem, worked: bool) -> Problem:
    return Problem(id=i, question=p.question, gold=str(p.answer), solution=p.solution if worked else None)


def _arithmetic(problem: Problem) -> ArithmeticProblem:
    parsed = parse_question(problem.question)
    if parsed is None:
        raise ValueError(f"not a question of the synthetic task: {problem.question!r}")
    return parsed
