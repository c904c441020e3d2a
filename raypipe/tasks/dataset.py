"""A user's own dataset as a Task: question / answer rows from JSONL, Parquet, a `datasets.save_to_disk` folder or
a hub dataset, graded as GSM8K (numbers) or MATH (LaTeX, math-verify).

Row formats read (field names from the config):
- GSM8K: `question`; `answer` = working lines, then `#### N`. The training target drops the calculator
  annotations `<<...>>` and writes the last line as `The answer is N.` (what the grader and the LEMA format read).
- MATH: `problem`; `solution` holding `\\boxed{...}`; or an explicit final-answer field beside the solution.
- The answer alone (a string or a JSON number): enough for pool, dev and test rows.
A bad row is set aside with its file, row and field (never dropped silently); a pool row's worked solution is
never read, only its final answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from raypipe.config import TaskConfig
from raypipe.data.rows import (DataError, Problem as RowProblem, RawRow, as_object, json_type, read_records,
                               sort_rows, text_problem)
from raypipe.grading import extract_answer
from raypipe.tasks.base import Problem, Splits, Task

CALCULATOR = re.compile(r"<<[^<>]*>>")
GSM8K_FINAL = re.compile(r"\n?####\s*(.+?)\s*$", re.DOTALL)


def worked_solution(text: str, kind: str) -> str:
    """A dataset's worked solution as a training target: GSM8K's calculator annotations removed and its `#### N`
    line written `The answer is N.`; other formats unchanged but for surrounding whitespace."""
    text = CALCULATOR.sub("", text).strip()
    final = GSM8K_FINAL.search(text)
    if final is not None:
        text = text[: final.start()].rstrip() + f"\nThe answer is {final.group(1)}."
    return text


class DatasetTask(Task):
    """The splits come from the `task.*_path` files (see TaskConfig for how missing pool and dev are made)."""

    capabilities = frozenset()

    def __init__(self, cfg: TaskConfig) -> None:
        super().__init__(cfg)
        if cfg.answer_kind is None:
            raise DataError("task.answer_kind must be set for a dataset task ('gsm8k' or 'math')")
        self.answer_kind = cfg.answer_kind

    def load_splits(self) -> Splits:
        cfg, rejected = self.cfg, []
        test = self._read(cfg.test_path, "test", rejected)[: cfg.test_problems] if cfg.test_path else []
        train = self._read(cfg.train_path, "train", rejected, worked=True) if cfg.train_path else []
        if cfg.dev_path:
            dev = self._read(cfg.dev_path, "dev", rejected)
        else:
            if cfg.train_path and len(train) <= cfg.dev_problems:
                raise DataError(f"{cfg.train_path}: {len(train)} usable rows, too few to hold out "
                                f"task.dev_problems={cfg.dev_problems} as dev and train on the rest (set "
                                "task.dev_path or a smaller task.dev_problems)")
            train, dev = (train[: len(train) - cfg.dev_problems], train[len(train) - cfg.dev_problems:]) \
                if train else ([], [])
        worked = train[: cfg.sft_problems]
        if cfg.pool_path:
            pool = self._read(cfg.pool_path, "pool", rejected)
        else:
            pool = [{**row, "solution": None} for row in train[cfg.sft_problems:]]
        return Splits(worked=_problems(worked), pool=_problems(pool[: cfg.pool_questions]),
                      dev=_problems(dev[: cfg.dev_problems]), test=_problems(test), rejected=rejected)

    def _read(self, path: str, split: str, rejected: list[dict[str, Any]], worked: bool = False) -> list[dict]:
        """The usable rows of one file, each {question, gold, solution, source}; bad rows go to `rejected`."""
        cfg = self.cfg
        fields = [cfg.question_field, cfg.answer_field] + ([cfg.solution_field] if cfg.solution_field else [])
        rows, bad = sort_rows(Path(path), read_records(Path(path)), lambda raw: self._parse(raw, worked), None,
                              cfg.max_rejected_fraction,
                              f" (fields {', '.join(repr(f) for f in fields)} are read; see task.*_field)")
        rejected += [{**r, "split": split} for r in bad]
        return [{**r, "source": f"{path}:{r['row']}"} for r in rows]

    def _parse(self, raw: RawRow, worked: bool) -> dict[str, Any] | RowProblem:
        cfg, record = self.cfg, raw.value
        problem = as_object(record) or text_problem(record, cfg.question_field)
        if problem is not None:
            return problem
        gold = self._gold(record)
        if isinstance(gold, RowProblem):
            return gold
        solution = None
        if worked:
            field = cfg.solution_field or cfg.answer_field
            problem = text_problem(record, field)
            if problem is not None:
                return problem
            solution = worked_solution(record[field], self.answer_kind)
        return {"question": record[cfg.question_field].strip(), "gold": gold, "solution": solution}

    def _gold(self, record: dict[str, Any]) -> str | RowProblem:
        """The final answer: a JSON number as written, the answer extracted from a worked solution, or (when the
        solution has its own field) the answer field's text itself."""
        name = self.cfg.answer_field
        answer = record.get(name)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            gold = json.dumps(answer)
            if any(c not in "-.0123456789" for c in gold):
                return RowProblem(name, "wrong_type", f"the number {gold} is not written out in digits; give it "
                                                      "as a string")
            return gold
        if answer is not None and not isinstance(answer, str):
            return RowProblem(name, "wrong_type", f"expected a string or a number, got {json_type(answer)}")
        problem = text_problem(record, name)
        if problem is not None:
            return problem
        gold = extract_answer(answer, self.answer_kind)
        separate = self.cfg.solution_field not in (None, name)
        if gold is None and separate:
            gold = answer.strip()
        if gold is None:
            return RowProblem(name, "no_final_answer", f"no final answer found for answer_kind "
                                                       f"'{self.answer_kind}'")
        return gold


def _problems(rows: list[dict[str, Any]]) -> list[Problem]:
    return [Problem(id=i, question=r["question"], gold=r["gold"], solution=r["solution"], source=r["source"])
            for i, r in enumerate(rows)]
