"""A round on a user's own dataset: the GSM8K recipe pointed at a GSM8K-format file a tiny model can learn (the
synthetic problems reworded as stories), with no exact checker anywhere: tiny model built from the file's text,
warm-up to the mid band, one Step-DPO round by Monte-Carlo localisation, accuracy on the test file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.config import TaskConfig, load_config
from raypipe.data.synthetic import load_splits
from raypipe.pipeline import Pipeline
from tests.conftest import write_gsm8k_format

ROOT = Path(__file__).resolve().parents[1]
BAD_ROWS = ('{"question": "How many?"}', "not json at all")
SMALLER = ["task.sft_problems=1200", "task.pool_questions=64", "task.dev_problems=100", "task.test_problems=80",
           "sampling.questions_per_round=64", "sampling.samples_per_question=6", "sampling.max_new_tokens=64",
           "eval.max_new_tokens=64", "branch.rollouts=6", "eval.assessment_questions=0", "control.enabled=false",
           "wandb.mode=disabled"]
"""Sizes for the test's time budget; the task, warm-up and method settings are the recipe's."""


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    data = tmp_path_factory.mktemp("gsm8k_format")
    problems = load_splits(TaskConfig(num_steps_min=2, num_steps_max=2, operand_max=30, sft_problems=1400,
                                      pool_questions=1, dev_problems=1, test_problems=80))
    train = write_gsm8k_format(data / "train.jsonl", problems["sft"], BAD_ROWS)
    test = write_gsm8k_format(data / "test.jsonl", problems["test"])
    cfg = load_config(ROOT / "conf" / "stepdpo_gsm8k.yaml",
                      [f"task.train_path={train}", f"task.test_path={test}", *SMALLER,
                       f"output_dir={tmp_path_factory.mktemp('runs')}"])
    return {"cfg": cfg, "summary": Pipeline(cfg).run(), "train": train}


def test_a_round_on_a_gsm8k_format_file(dataset_run: dict) -> None:
    run_dir, round_1 = dataset_run["cfg"].run_dir, dataset_run["summary"]["rounds"][0]
    init = json.loads((run_dir / "round_0/init/manifest.json").read_text())["metrics"]
    assert init["splits"] == {"worked": 1200, "pool": 64, "dev": 100, "test": 80}
    assert init["rejected_by_reason"] == {"missing_field": 1, "invalid_json": 1}
    rejected = [json.loads(line) for line in (run_dir / "round_0/init/rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"]) for r in rejected] == [(1401, "answer"), (1402, "<row>")]
    sft = json.loads((run_dir / "round_0/sft/manifest.json").read_text())["metrics"]
    assert sft["dev_history"][-1]["accuracy"] >= 0.2 and sft["steps"] < 1500, "stopped in the band, not at the cap"
    assert round_1["accuracy_before"] >= 0.2 and round_1["n_pairs"] > 0
    assert round_1["accuracy_after"] is not None and round_1["train_steps"] > 0
    assert round_1["localised_fraction"] > 0
    branch = json.loads((run_dir / "round_1/branch/manifest.json").read_text())["metrics"]
    assert branch["mc_exact_agreement"] is None and "no exact" in branch["mc_exact_agreement_why"]
    pairs = pq.read_table(run_dir / "round_1/build/data.parquet").to_pylist()
    for pair in pairs:
        assert pair["chosen"] != pair["rejected"] and pair["chosen"].strip() and pair["rejected"].strip()
        assert pair["initial_reason_steps"].count("\n") >= pair["first_wrong_step"], "prefix = steps before k"
    predictions = pq.read_table(run_dir / "round_1/evaluate/data.parquet").to_pylist()
    assert len(predictions) == 80 and sum(p["correct"] for p in predictions) == round(80 * round_1["accuracy_after"])
