"""LEMA's text formats: the numbered wrong solution, the corrector's few-shot prompt, the three-field correction,
its parsing, and the correction training example.

A correction is written as

    Incorrect Step: Step k.
    Explanation: <what went wrong>
    Correct Solution: {
    ...                      (the unchanged steps before k; absent when k = 1)
    Step k: ...
    Step m: The answer is X.
    }
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

from raypipe.grading import extract_answer

CORRECTOR_INSTRUCTION = ("The solutions to the following math problems may contain errors. For each one, find the "
                         "incorrect step, explain why it is wrong, and give the correct solution from that step on.")
TRAIN_INSTRUCTION = ("The solution below is incorrect. Find the incorrect step, explain why it is wrong, and "
                     "correct the solution from that step on.")
STEP_LINE = re.compile(r"^Step\s+(\d+)\s*:\s*")


@dataclass(frozen=True)
class Correction:
    """The three fields; `corrected` holds the rewritten steps k..m, numbered."""

    incorrect_step: int
    explanation: str
    corrected: tuple[str, ...]

    def text(self, explanation: bool = True) -> str:
        """The corrector's answer after `Incorrect Step:` (also the training target of a correction example);
        `explanation=False` leaves the Explanation field out (LEMA's explanation-free ablation)."""
        prefix = ["..."] if self.incorrect_step > 1 else []
        body = "\n".join([*prefix, *self.corrected])
        why = f"Explanation: {self.explanation}\n" if explanation else ""
        return f" Step {self.incorrect_step}.\n{why}Correct Solution: {{\n{body}\n}}"


def numbered_steps(completion: str) -> list[str]:
    """The solution as `Step k: ...` lines: lines already numbered keep their text, others get the next number
    (the embedded task's unnumbered `The answer is X.` becomes the last step)."""
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return [line if STEP_LINE.match(line) else f"Step {k}: {line}" for k, line in enumerate(lines, start=1)]


def solution_block(steps: Sequence[str]) -> str:
    return "{\n" + "\n".join(steps) + "\n}"


def correction_input(question: str, steps: Sequence[str]) -> str:
    """The input of a correction training example, ending where the model writes the fields."""
    return (f"{TRAIN_INSTRUCTION}\nQuestion: {question.strip()}\nOriginal Solution: {solution_block(steps)}\n"
            "Incorrect Step:")


@cache
def demonstrations(kind: str) -> list[dict]:
    examples = yaml.safe_load(resources.files("raypipe.lema").joinpath("examples.yaml").read_text())
    if kind not in examples:
        raise ValueError(f"no corrector demonstrations for answer kind {kind!r} (have {', '.join(examples)})")
    return examples[kind]


def corrector_prompt(kind: str, question: str, steps: Sequence[str]) -> str:
    """The few-shot prompt: the instruction, four worked corrections of the answer kind, then this solution, ending
    at `Incorrect Step:` for the corrector to continue."""
    shots = []
    for ex in demonstrations(kind):
        fields = Correction(ex["incorrect_step"], ex["explanation"], tuple(ex["corrected"])).text()
        shots.append(f"Question: {ex['question']}\nOriginal Solution: {solution_block(ex['solution'])}\n"
                     f"Incorrect Step:{fields}")
    query = f"Question: {question.strip()}\nOriginal Solution: {solution_block(steps)}\nIncorrect Step:"
    return "\n\n".join([CORRECTOR_INSTRUCTION, *shots, query])


FIELDS = re.compile(r"^\s*(?:Incorrect Step:)?\s*Step\s+(?P<step>\d+)\s*\.?\s*Explanation:\s*(?P<explanation>.*?)"
                    r"\s*Correct Solution:\s*(?P<solution>.*)", re.DOTALL)
CLOSING = re.compile(r"^\s*\}\s*$", re.MULTILINE)
"""The line that ends the corrected solution (a `}` alone: LaTeX braces inside steps do not end it)."""


def parse_correction(output: str, num_steps: int) -> Correction | str:
    """The correction in a corrector's output, or why it cannot be used (a reason counted in the manifest)."""
    found = FIELDS.match(output)
    if found is None:
        if not re.match(r"^\s*(?:Incorrect Step:)?\s*Step\s+\d+", output):
            return "no_incorrect_step"
        return "no_explanation" if "Explanation:" not in output else "no_correct_solution"
    step = int(found["step"])
    if not 1 <= step <= num_steps:
        return "step_out_of_range"
    explanation = " ".join(found["explanation"].split())
    if not explanation:
        return "no_explanation"
    solution = found["solution"].strip()
    if not solution.startswith("{"):
        return "no_correct_solution"
    closing = CLOSING.search(solution, 1)
    if closing is None:
        return "unclosed_solution"
    lines = [line.strip() for line in solution[1:closing.start()].splitlines() if line.strip()]
    steps = tuple(line for line in lines if line != "...")
    if not steps:
        return "no_correct_solution"
    return Correction(step, explanation, steps)


def final_answer(correction: Correction, kind: str) -> str | None:
    """The answer the corrected solution ends with (the filter compares it with the gold answer)."""
    return extract_answer(correction.corrected[-1], kind)
