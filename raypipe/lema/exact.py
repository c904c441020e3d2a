"""An exact corrector for the embedded task: it knows each problem's true steps, so it writes the correction a
perfect corrector would (which step, what kind of mistake, the solution from there). LEMA runs offline with it."""

from __future__ import annotations

import re
from collections.abc import Sequence

from raypipe.data.synthetic import ArithmeticProblem, answer_line, first_wrong_step
from raypipe.lema.format import Correction, correction_input, numbered_steps

CALCULATION = re.compile(r"^Step\s+\d+\s*:\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)\s*$")
VERBS = {"+": "add", "-": "subtract", "*": "multiply by"}


def exact_correction(problem: ArithmeticProblem, completion: str) -> Correction | None:
    """The correction of a wrong chain; None when every step is right (nothing to correct from a step)."""
    completion = "\n".join(line.strip() for line in completion.splitlines() if line.strip())  # as numbered_steps
    k = first_wrong_step(problem, completion)
    if k is None:
        return None
    steps = numbered_steps(completion)
    n = len(problem.steps)
    true_lines = [*problem.steps, f"Step {n + 1}: {answer_line(problem.answer)}"]
    if k > n + 1:  # every step right, then more text after the answer: nothing to rewrite from a step
        return None
    if k > len(steps):  # cut short: the first missing step is the mistake
        explanation = f"The solution stops after step {len(steps)} without reaching the answer."
    else:
        explanation = _explain(problem, steps[k - 1], k)
    return Correction(k, explanation, tuple(true_lines[k - 1:]))


def _explain(problem: ArithmeticProblem, written: str, k: int) -> str:
    n = len(problem.steps)
    if k == n + 1:
        return f"The answer must repeat the last result, {problem.answer}."
    value, op, operand, result = CALCULATION.match(problem.steps[k - 1]).groups()  # type: ignore[union-attr]
    found = CALCULATION.match(written)
    if found is None:
        return f"Step {k} should be the calculation {value} {op} {operand} = {result}."
    a, o, b, c = found.groups()
    if a != value:
        source = "the start value is" if k == 1 else f"step {k - 1} gave"
        return f"Step {k} starts from {a}, but {source} {value}."
    if (o, b) != (op, operand):
        return f"The question says to {VERBS[op]} {operand} here, but step {k} computes {a} {o} {b}."
    return f"{value} {op} {operand} is {result}, not {c}."


def format_corpus(problems: Sequence[ArithmeticProblem]) -> list[str]:
    """Correction examples of deliberately broken worked solutions (each kind of mistake in turn), so the tiny
    model's tokenizer learns the correction format's words (`model.extra_corpus: [lema]`)."""
    texts = []
    for i, problem in enumerate(problems):
        lines = [*problem.steps, answer_line(problem.answer)]
        k = i % len(problem.steps)
        value, op, operand, result = CALCULATION.match(problem.steps[k]).groups()  # type: ignore[union-attr]
        other = "-" if op == "+" else "+"
        lines[k] = [f"Step {k + 1}: {value} {op} {operand} = {int(result) + 1}",
                    f"Step {k + 1}: {int(value) + 10} {op} {operand} = {result}",
                    f"Step {k + 1}: {value} {other} {operand} = {result}"][i % 3]
        if i % 4 == 3:
            lines = [*problem.steps, answer_line(problem.answer + 1)]
        broken = "\n".join(lines)
        correction = exact_correction(problem, broken)
        if correction is not None:
            texts.append(correction_input(problem.question, numbered_steps(broken)) + correction.text())
    return texts
