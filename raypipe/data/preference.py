"""Existing preference data as training pairs: the Math-Step-DPO-10K schema or TRL's preference format, read so
that a bad row is set aside with its file, row and field; and the round's own pairs written in TRL's format.

- Math-Step-DPO-10K: `prompt` (the raw question), `initial_reason_steps` (the correct steps before the compared
  one), `chosen` / `rejected` (single steps); optional `full_chosen`, `full_rejected`, `answer`, `dataset`. The
  question goes through the task's prompt (the model's chat template), the reasoning prefix follows it, and only the
  step tokens are scored, with no EOS (a step does not end the answer).
- TRL (`prompt`, `chosen`, `rejected`): plain text, used as written (TRL's standard format: the prompt is already
  what the model sees), or conversational message lists, rendered with the model's chat template. Whole answers
  end with EOS, as TRL trains them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from raypipe.data.rows import Problem, RawRow, as_object, json_type, read_records, sort_rows, text_problem
from raypipe.data.steps import COT_PREFILL
from raypipe.tasks import Task
from raypipe.tasks.prompts import plain_prompt

STEP_SCHEMA_FIELD = "initial_reason_steps"
"""A row with this field is read as Math-Step-DPO-10K; any other as TRL's format."""


def load_preference_pairs(path: Path, tokenizer: PreTrainedTokenizerBase, task: Task,
                          max_rejected_fraction: float = 1.0) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows with `chosen_ids` / `rejected_ids` and their loss masks, rejected records) of a pairs file."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731

    def parse(raw: RawRow) -> dict[str, Any] | Problem:
        record = raw.value
        problem = as_object(record)
        if problem is not None:
            return problem
        sides = _step_sides(record, tokenizer, task) if STEP_SCHEMA_FIELD in record else _trl_sides(record, tokenizer)
        if isinstance(sides, Problem):
            return sides
        context, chosen, rejected, eos = sides
        if chosen == rejected:
            return Problem("chosen", "same_as_rejected", "chosen and rejected are the same text")
        prompt_ids, end = encode(context), [tokenizer.eos_token_id] if eos else []
        question = record["prompt"] if isinstance(record["prompt"], str) else context
        row: dict[str, Any] = {"prompt": question, "chosen": chosen, "rejected": rejected,
                               "answer": str(record.get("answer") or ""), "source": f"{path}:{raw.row}"}
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            ids = encode(text) + end
            row[f"{side}_ids"] = prompt_ids + ids
            row[f"{side}_mask"] = [0] * len(prompt_ids) + [1] * len(ids)
        return row

    return sort_rows(path, read_records(path), parse, None, max_rejected_fraction,
                     " (Math-Step-DPO fields 'prompt', 'initial_reason_steps', 'chosen', 'rejected', or TRL's "
                     "'prompt', 'chosen', 'rejected')")


def _step_sides(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase,
                task: Task) -> tuple[str, str, str, bool] | Problem:
    for name in ("prompt", "chosen", "rejected"):
        problem = text_problem(record, name)
        if problem is not None:
            return problem
    prefix = record[STEP_SCHEMA_FIELD]
    if not isinstance(prefix, str):
        return Problem(STEP_SCHEMA_FIELD, "wrong_type", f"expected a string, got {json_type(prefix)}")
    prompt = task.prompt(tokenizer, record["prompt"])
    if prompt.endswith(COT_PREFILL) and prefix.startswith(COT_PREFILL):  # the plain prompt already says it
        prefix = prefix[len(COT_PREFILL):]
    return prompt + prefix, record["chosen"], record["rejected"], False


def _trl_sides(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> tuple[str, str, str, bool] | Problem:
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        messages = _messages(prompt, "prompt")
        if isinstance(messages, Problem):
            return messages
        if getattr(tokenizer, "chat_template", None):
            context = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            context = plain_prompt(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
    else:
        problem = text_problem(record, "prompt")
        if problem is not None:
            return problem
        context = prompt
    sides = []
    for name in ("chosen", "rejected"):
        value = record.get(name)
        if isinstance(value, list):
            messages = _messages(value, name)
            if isinstance(messages, Problem):
                return messages
            value = "".join(m["content"] for m in messages if m["role"] == "assistant")
            if not value.strip():
                return Problem(name, "empty_field", "has no assistant message with text")
        else:
            problem = text_problem(record, name)
            if problem is not None:
                return problem
        sides.append(value)
    return context, sides[0], sides[1], True


def _messages(value: list[Any], name: str) -> list[dict[str, str]] | Problem:
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return Problem(name, "wrong_type", f"message {i} is not an object with string 'role' and 'content'")
    return value


def trl_rows(rows: list[dict[str, Any]], decode: Any) -> list[dict[str, str]]:
    """Built pairs in TRL's standard preference format: `prompt` is exactly the text the model saw before the
    compared part (chat template and reasoning prefix included), `chosen` / `rejected` the compared text."""
    out = []
    for row in rows:
        n_prompt = row["chosen_mask"].index(1) if 1 in row["chosen_mask"] else len(row["chosen_ids"])
        out.append({"prompt": decode(list(row["chosen_ids"][:n_prompt])), "chosen": row["chosen"],
                    "rejected": row["rejected"]})
    return out


def write_trl_jsonl(path: Path, rows: list[dict[str, str]]) -> int:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
