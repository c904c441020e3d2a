"""The Task interface: step segmentation, the dataset task's loading (GSM8K / MATH formats, bad rows set aside),
the real GSM8K and MATH-500 files, prompts through a chat template, and capability checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypipe.config import ConfigError, RunConfig, TaskConfig, WarmupConfig, load_config
from raypipe.data.rows import DataError
from raypipe.data.steps import COT_PREFILL, StepSplitter, format_prompt, step_token_ends
from raypipe.data.tiny_model import build_tokenizer
from raypipe.tasks.checks import check_task
from raypipe.tasks import build_prompt, make_task
from raypipe.tasks.dataset import worked_solution
from tests.conftest import shared_data

QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""The shape of Qwen2's chat template (ChatML, a default system turn)."""


# ---- steps -----------------------------------------------------------------------------------------------------

def test_named_delimiters_cut_steps_and_drop_whitespace_only_ones() -> None:
    text = "a = 1\n\nb = 2\nThe answer is 3."
    assert StepSplitter("newline").split(text) == ["a = 1\n\n", "b = 2\n", "The answer is 3."]
    assert StepSplitter("blank_line").split(text) == ["a = 1\n\n", "b = 2\nThe answer is 3."]
    marked = "Let's go. Step 1: x. Step 2: y."
    assert StepSplitter("step_marker").split(marked) == ["Let's go. ", "Step 1: x. ", "Step 2: y."]
    assert StepSplitter(r";\s*").split("a; b;  c") == ["a; ", "b;  ", "c"]
    assert StepSplitter().split("\n\nfirst\n") == ["\n\nfirst\n"], "a leading blank step joins the first"
    for text in (text, marked, "", "x\n"):
        assert "".join(StepSplitter("newline").split(text)) == text


def test_token_ends_move_a_boundary_inside_a_token_to_its_end() -> None:
    tokens = ["Step", " 1", ": a\n", "Step", " 2\n", "The answer", " is 3."]
    assert step_token_ends(tokens) == [3, 5, 7]
    assert StepSplitter("step_marker").token_ends(["x.", " Step 1", ": a.", " St", "ep 2: b"]) == [2, 4, 5]
    assert StepSplitter().token_ends(["a\n", "\n", "b"]) == [2, 3], "the blank line joins the step before it"
    assert StepSplitter().token_ends([]) == []


def test_a_bad_delimiter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"task.step_delimiter.*valid regular expression"):
        load_config(None, ["task.step_delimiter=(unclosed"])


# ---- the dataset task ------------------------------------------------------------------------------------------

def _rows(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_gsm8k_rows_become_worked_pool_dev_and_test(tmp_path: Path) -> None:
    train = [{"question": f"Q{i}?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(10)]
    train[3] = {"question": "no answer here"}
    train.insert(5, "{not json")
    cfg = TaskConfig(source="dataset", answer_kind="gsm8k", train_path=_rows(tmp_path / "train.jsonl", train),
                     test_path=_rows(tmp_path / "test.jsonl", [{"question": "T?", "answer": "#### 1,600"},
                                                               {"question": "U?", "answer": 7}]),
                     sft_problems=4, dev_problems=2)
    splits = make_task(cfg).splits
    assert splits.sizes() == {"worked": 4, "pool": 3, "dev": 2, "test": 2}
    assert splits.worked[0].solution == "0 + 1 = 1\nThe answer is 1." and splits.worked[0].gold == "1"
    assert [p.id for p in splits.worked] == [0, 1, 2, 3], "ids are positions in the split"
    assert all(p.solution is None for p in splits.pool), "a pool question never carries its worked solution"
    assert [p.gold for p in splits.test] == ["1600", "7"]
    assert [p.question for p in splits.dev] == ["Q8?", "Q9?"], "dev is held out from the train file's end"
    assert {(r["row"], r["field"], r["reason"], r["split"]) for r in splits.rejected} == {
        (4, "answer", "missing_field", "train"), (6, "<row>", "invalid_json", "train")}
    assert all(r["file"] == cfg.train_path for r in splits.rejected)


def test_math_rows_with_a_separate_answer_field_and_other_formats(tmp_path: Path) -> None:
    import datasets
    import pandas as pd

    rows = [{"problem": f"What is {i}/2?", "solution": f"Halve it: $\\boxed{{\\frac{{{i}}}{{2}}}}$.",
             "answer": f"\\frac{{{i}}}{{2}}"} for i in range(1, 7)]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    datasets.Dataset.from_list(rows[:2]).save_to_disk(str(tmp_path / "test"))
    cfg = TaskConfig(source="dataset", answer_kind="math", question_field="problem", solution_field="solution",
                     train_path=str(tmp_path / "train.parquet"), test_path=str(tmp_path / "test"), sft_problems=3,
                     dev_problems=1)
    task = make_task(cfg)
    splits = task.splits
    assert splits.sizes() == {"worked": 3, "pool": 2, "dev": 1, "test": 2}
    assert splits.worked[0].solution == rows[0]["solution"] and splits.worked[0].gold == "\\frac{1}{2}"
    assert task.grade("so \\boxed{0.5}", splits.worked[0].gold).correct, "math-verify equivalence"
    assert not task.grade("so \\boxed{2}", splits.worked[0].gold).correct


def test_unusable_dataset_files_are_clear_errors(tmp_path: Path) -> None:
    cfg = TaskConfig(source="dataset", answer_kind="gsm8k", test_path=str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        make_task(cfg).splits
    bad = _rows(tmp_path / "bad.jsonl", [{"q": "x", "answer": "#### 1"}] * 3)
    with pytest.raises(DataError, match=r"bad.jsonl: no usable rows .*field 'question'"):
        make_task(TaskConfig(source="dataset", answer_kind="gsm8k", test_path=bad)).splits
    with pytest.raises(ConfigError, match="task.answer_kind must be set"):
        load_config(None, ["task.source=dataset", f"task.test_path={bad}", f"task.train_path={bad}"])


def test_worked_solution_drops_calculator_annotations() -> None:
    assert worked_solution("He has 3*4=<<3*4=12>>12.\n#### 12", "gsm8k") == "He has 3*4=12.\nThe answer is 12."
    assert worked_solution("So $\\boxed{5}$.", "math") == "So $\\boxed{5}$."


# ---- the real benchmark files ----------------------------------------------------------------------------------

def test_real_gsm8k_loads_through_the_task(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    cfg = TaskConfig(source="dataset", answer_kind="gsm8k", train_path=str(shared_data("gsm8k", "train.jsonl")),
                     test_path=str(shared_data("gsm8k", "test.jsonl")), test_problems=10_000)
    task = make_task(cfg)
    splits = task.splits
    assert splits.sizes() == {"worked": 2000, "pool": 4000, "dev": 200, "test": 1319} and not splits.rejected
    assert splits.test[0].gold == "18" and splits.worked[0].gold == "72"
    first = splits.worked[0]
    assert "<<" not in first.solution and first.solution.endswith("The answer is 72.")
    assert task.steps.split(first.solution) == ["Natalia sold 48/2 = 24 clips in May.\n",
                                                "Natalia sold 48+24 = 72 clips altogether in April and May.\n",
                                                "The answer is 72."]
    assert all(task.grade(p.solution, p.gold).correct for p in splits.worked), "every target grades right"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert task.prompt(tok, splits.test[0].question) == format_prompt(splits.test[0].question)


def test_real_math500_loads_through_the_task() -> None:
    path = str(shared_data("math500", "test.jsonl"))
    task = make_task(TaskConfig(source="dataset", answer_kind="math", test_path=path, train_path=path,
                                step_delimiter="blank_line", dev_problems=50, sft_problems=400))
    splits = task.splits
    assert splits.sizes() == {"worked": 400, "pool": 50, "dev": 50, "test": 500} and not splits.rejected
    assert [p.gold for p in splits.test[:3]] == ["\\left( 3, \\frac{\\pi}{2} \\right)", "p - q", "\\frac{14}{3}"]
    assert task.grade("Thus $\\boxed{\\frac{28}{6}}$.", splits.test[2].gold).correct
    steps = task.steps.split(splits.worked[0].solution)
    assert "".join(steps) == splits.worked[0].solution and len(steps) == 5  # paragraphs; its [asy] block has 3
    assert steps[0].startswith("We have that") and steps[-1].startswith("Therefore, the polar coordinates")
    assert all(task.grade(p.solution, p.gold).correct for p in splits.worked[:100])


# ---- prompts ---------------------------------------------------------------------------------------------------

def test_prompts_follow_the_models_chat_template() -> None:
    tok = build_tokenizer(["What is 2 + 2?\n" + COT_PREFILL + "Step 1: 2 + 2 = 4\n"])
    question = "What is 2 + 2?"
    assert build_prompt(tok, question) == format_prompt(question), "the tiny template renders the plain prompt"
    assert build_prompt(tok, question, system_prompt="Be brief.") == format_prompt(question)
    tok.chat_template = QWEN_TEMPLATE
    assert build_prompt(tok, question, instruction="Let's think step by step.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?\n"
        "Let's think step by step.<|im_end|>\n<|im_start|>assistant\n")
    assert build_prompt(tok, question, system_prompt="Be brief.").startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>")
    tok.chat_template = None
    assert build_prompt(tok, question, instruction="Show your work.") == f"{question}\nShow your work.\n{COT_PREFILL}"


# ---- capabilities ----------------------------------------------------------------------------------------------

def test_a_stage_that_needs_a_missing_capability_is_a_config_error(tmp_path: Path) -> None:
    rows = [{"question": f"Q{i}?", "answer": f"{i}\n#### {i}"} for i in range(20)]
    data = _rows(tmp_path / "d.jsonl", rows)
    task_cfg = TaskConfig(source="dataset", answer_kind="gsm8k", train_path=data, test_path=data, sft_problems=5,
                          dev_problems=5)
    task = make_task(task_cfg)
    for method, section, value, words in [("stepdpo", "branch", ("localiser", "exact"), "branch.localiser=exact"),
                                          ("aft", "aft", ("constraint", "rank"), "aft.constraint=rank"),
                                          ("lema", "lema", ("corrector", "exact"), "lema.corrector=exact")]:
        cfg = RunConfig(method=method, task=task_cfg)
        setattr(getattr(cfg, section), *value)
        with pytest.raises(ConfigError, match=f"{words}.*which the dataset task does not have"):
            check_task(cfg, task)
    check_task(RunConfig(method="stepdpo", task=task_cfg), task)  # mc needs only the grader
    synthetic = RunConfig(method="stepdpo", task=TaskConfig(sft_problems=10, pool_questions=10, dev_problems=5,
                                                            test_problems=5))
    synthetic.branch.localiser = "exact"
    check_task(synthetic, make_task(synthetic.task))
    no_pool = RunConfig(method="stepdpo", task=TaskConfig(**{**vars(task_cfg), "sft_problems": 100}))
    with pytest.raises(ConfigError, match="pool is empty"):
        check_task(no_pool, make_task(no_pool.task))
    no_worked = TaskConfig(**{**vars(task_cfg), "sft_problems": 0})
    with pytest.raises(ConfigError, match="method rft trains on worked solutions"):
        check_task(RunConfig(method="rft", task=no_worked, warmup=WarmupConfig(max_steps=0)), make_task(no_worked))
    with pytest.raises(ConfigError, match=r"control \(control.enabled\) trains on worked solutions"):
        check_task(RunConfig(method="stepdpo", task=no_worked, warmup=WarmupConfig(max_steps=0)), make_task(no_worked))


def test_user_mistakes_in_a_dataset_run_exit_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from raypipe.cli import main

    conf = Path(__file__).resolve().parents[1] / "conf"
    missing = tmp_path / "nope.jsonl"
    assert main(["run", str(conf / "stepdpo_gsm8k.yaml"), f"task.train_path={missing}",
                 f"output_dir={tmp_path}"]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err
    test = _rows(tmp_path / "test.jsonl", [{"question": "Q?", "answer": "#### 1"}])
    assert main(["run", str(conf / "stepdpo_pairs.yaml"), f"task.test_path={test}", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and "pool is empty" in err and "task.pairs_path" in err
