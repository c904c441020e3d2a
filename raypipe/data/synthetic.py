"""The embedded default task: chained arithmetic word problems with exactly verifiable steps.

`Start with 17. Add 25. Subtract 9. What is the result?` is answered as
`Step 1: 17 + 25 = 42` / `Step 2: 42 - 9 = 33` / `The answer is 33.`. Every problem knows its true steps, so the
first wrong step of any chain is known exactly: the ground truth the Monte-Carlo localiser is measured against.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from raypipe.config import TaskConfig
from raypipe.data.steps import format_prompt, split_steps

_VERBS = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}."}
_MAX_VALUE = 999
SPLITS = ("sft", "pool", "dev", "test")


@dataclass(frozen=True)
class ArithmeticProblem:
    """One task instance: the question, its true step lines (without newlines) and the final answer."""

    question: str
    steps: tuple[str, ...]
    answer: int

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)

    @property
    def solution(self) -> str:
        """The worked solution (what SFT trains on), without the end-of-sequence token."""
        return "".join(f"{s}\n" for s in self.steps) + answer_line(self.answer)

    @property
    def num_steps(self) -> int:
        """Steps as localisers count them: each operation line plus the answer line."""
        return len(self.steps) + 1


def answer_line(answer: int | str) -> str:
    return f"The answer is {answer}."


def make_problem(rng: random.Random, cfg: TaskConfig) -> ArithmeticProblem:
    value = rng.randint(cfg.operand_min, cfg.operand_max)
    clauses, steps = [f"Start with {value}."], []
    for k in range(1, rng.randint(cfg.num_steps_min, cfg.num_steps_max) + 1):
        op = rng.choice(cfg.operations)
        operand = rng.randint(2, 9) if op == "*" else rng.randint(cfg.operand_min, cfg.operand_max)
        if (op == "-" and operand > value) or (op == "*" and value * operand > _MAX_VALUE):
            op = "+"  # keep every value a small non-negative integer
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        clauses.append(_VERBS[op].format(operand))
        steps.append(f"Step {k}: {value} {op} {operand} = {result}")
        value = result
    return ArithmeticProblem(question=" ".join(clauses) + " What is the result?", steps=tuple(steps), answer=value)


_CLAUSE = re.compile(r"(Start with|Add|Subtract|Multiply by) (\d+)\.")


def parse_question(question: str) -> ArithmeticProblem | None:
    """The problem a question of this task states (its true steps follow from the clauses); None when the text is
    not one of this task's questions."""
    clauses = _CLAUSE.findall(question)
    if not clauses or clauses[0][0] != "Start with" or not question.rstrip().endswith("What is the result?"):
        return None
    value, steps = int(clauses[0][1]), []
    for k, (verb, number) in enumerate(clauses[1:], start=1):
        op = {"Add": "+", "Subtract": "-", "Multiply by": "*", "Start with": None}[verb]
        if op is None:
            return None
        operand = int(number)
        result = value + operand if op == "+" else value - operand if op == "-" else value * operand
        steps.append(f"Step {k}: {value} {op} {operand} = {result}")
        value = result
    return ArithmeticProblem(question=question, steps=tuple(steps), answer=value)


def generate_split(cfg: TaskConfig, split: str, n: int) -> list[ArithmeticProblem]:
    """`n` problems of one split. Splits use separate seeds and never share a question with dev or test."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    held_out: set[str] = set()
    if split in ("sft", "pool"):
        held_out = {p.question for s in ("dev", "test") for p in generate_split(cfg, s, _size(cfg, s))}
    rng = random.Random(f"{cfg.seed}/{split}")
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    while len(problems) < n:
        problem = make_problem(rng, cfg)
        if problem.question not in held_out and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def _size(cfg: TaskConfig, split: str) -> int:
    return {"sft": cfg.sft_problems, "pool": cfg.pool_questions, "dev": cfg.dev_problems,
            "test": cfg.test_problems}[split]


def load_splits(cfg: TaskConfig) -> dict[str, list[ArithmeticProblem]]:
    return {split: generate_split(cfg, split, _size(cfg, split)) for split in SPLITS}


def first_wrong_step(problem: ArithmeticProblem, completion: str) -> int | None:
    """The exact localiser: 1-based index of the first step line that is not the true one, None if all are.

    Step n+1 is the answer line; anything after it (or a missing line) counts as wrong there.
    """
    lines = [line.strip() for line in split_steps(completion)]
    expected = [*problem.steps, answer_line(problem.answer)]
    for k, want in enumerate(expected, start=1):
        if k > len(lines) or lines[k - 1] != want:
            return k
    return len(expected) + 1 if len(lines) > len(expected) else None
