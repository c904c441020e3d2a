"""The embedded task: deterministic splits, the exact step verifier, and the tokenizer's prefix property."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from raypipe.config import TaskConfig
from raypipe.data.steps import split_steps, step_token_ends
from raypipe.data.synthetic import first_wrong_step, generate_split, load_splits
from raypipe.grading import grade


def test_splits_are_deterministic_and_disjoint(task_cfg: TaskConfig) -> None:
    first, again = load_splits(task_cfg), load_splits(task_cfg)
    assert first == again
    held_out = {p.question for s in ("dev", "test") for p in first[s]}
    assert not held_out & {p.question for s in ("sft", "pool") for p in first[s]}
    assert len(first["sft"]) == task_cfg.sft_problems


def test_solutions_follow_the_step_format_and_grade_correct() -> None:
    cfg = TaskConfig(num_steps_min=2, num_steps_max=5, operations=["+", "-", "*"])
    for p in generate_split(cfg, "test", 200):
        lines = split_steps(p.solution)
        assert [line.split(":")[0] for line in lines[:-1]] == [f"Step {k}" for k in range(1, len(p.steps) + 1)]
        assert lines[-1] == f"The answer is {p.answer}."
        assert p.answer >= 0 and 2 <= len(p.steps) <= 5
        assert grade(p.solution, str(p.answer), "synthetic").correct
        assert first_wrong_step(p, p.solution) is None


def test_exact_verifier_finds_the_first_wrong_step() -> None:
    p = generate_split(TaskConfig(), "test", 1)[0]
    lines = split_steps(p.solution)
    for k in range(1, len(lines) + 1):
        broken = lines.copy()
        broken[k - 1] = broken[k - 1].replace(str(p.answer) if k == len(lines) else broken[k - 1][-2], "#")
        assert first_wrong_step(p, "".join(broken)) == k
    assert first_wrong_step(p, "".join(lines[:2])) == 3  # stopped early
    assert first_wrong_step(p, p.solution + "\nStep 9: 1 + 1 = 2") == p.num_steps + 1  # kept going


def test_prompt_tokens_are_a_prefix_and_steps_end_on_newlines(tiny_model_dir: Path, task_cfg: TaskConfig) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for p in generate_split(task_cfg, "sft", 100):
        prompt = tok(p.prompt, add_special_tokens=False).input_ids
        full = tok(p.prompt + p.solution, add_special_tokens=False).input_ids
        assert full[: len(prompt)] == prompt
        completion = full[len(prompt):]
        ends = step_token_ends([tok.decode([t]) for t in completion])
        pieces = [tok.decode(completion[a:b]) for a, b in zip([0, *ends], ends)]
        assert pieces == split_steps(p.solution)
        assert all(len(tok.decode([t])) == 1 for t in completion if tok.decode([t]).isdigit())
