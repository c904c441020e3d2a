"""One true end-to-end round on the real stack (Ray Data + vLLM, Ray Train + DeepSpeed), then resume."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
from transformers import AutoModelForCausalLM

from raypipe.pipeline import Pipeline
from raypipe.report import ROUND_STAGES

STEPDPO_STAGES = tuple(s for s in ROUND_STAGES if s != "correct")  # every round stage but LEMA's
SUMMARY_KEYS = {"accuracy_before", "accuracy_after", "control_accuracy_after", "n_pairs", "mc_exact_agreement",
                "rollouts_per_pair", "stage_seconds", "assessment_before", "assessment_after", "train_steps"}


def test_a_full_round_runs_and_reports(e2e_run: dict) -> None:
    cfg, summary = e2e_run["cfg"], e2e_run["summary"]
    run_dir = cfg.run_dir
    written = json.loads((run_dir / "summary.json").read_text())
    assert written == summary and len(summary["rounds"]) == 1
    round_1 = summary["rounds"][0]
    assert SUMMARY_KEYS <= round_1.keys()
    assert set(round_1["stage_seconds"]) == set(STEPDPO_STAGES)
    sft_dev = json.loads((run_dir / "round_0/sft/manifest.json").read_text())["metrics"]["dev_history"]
    assert sft_dev and sft_dev[-1]["accuracy"] >= 0.2, "SFT stops in the band, not at 0%"
    assert 0.1 <= round_1["accuracy_before"] <= 1.0
    assert round_1["n_pairs"] > 0 and round_1["rollouts_per_pair"] > 0
    assert 0.0 <= round_1["mc_exact_agreement"] <= 1.0
    assert 0.0 <= round_1["assessment_before"] <= 1.0 and 0.0 <= round_1["assessment_after"] <= 1.0
    pairs = pq.read_table(run_dir / "round_1/reference/data").to_pylist()
    assert len(pairs) == round_1["n_pairs"]
    assert {"prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer",
            "ref_chosen_logps", "ref_rejected_logps", "round", "model_version"} <= pairs[0].keys()
    train = json.loads((run_dir / "round_1/train/manifest.json").read_text())["metrics"]
    control = json.loads((run_dir / "round_1/control/manifest.json").read_text())["metrics"]
    assert train["steps"] > 0 and control["steps"] == train["steps"], "the control trains for the same steps"
    first_log = json.loads((run_dir / "round_1/train/train_log.jsonl").read_text().splitlines()[0])
    assert "rewards/accuracy" in first_log
    AutoModelForCausalLM.from_pretrained(train["model_dir"])  # the next round's policy is a normal HF dir
    assert (run_dir / "accuracy.png").stat().st_size > 0 and (run_dir / "config.yaml").is_file()
    assert any((run_dir / "wandb").glob("offline-run-*"))


def test_rerun_resumes_only_the_deleted_stage(e2e_run: dict) -> None:
    cfg = e2e_run["cfg"]
    last = cfg.run_dir / "round_1" / STEPDPO_STAGES[-1]
    before = json.loads((last / "manifest.json").read_text())
    shutil.rmtree(last)
    pipeline = Pipeline(cfg)
    summary = pipeline.run()
    assert pipeline.store.executed == [f"round_1/{STEPDPO_STAGES[-1]}"]
    assert len(pipeline.store.skipped) == 4 + len(STEPDPO_STAGES) - 1
    assert json.loads((last / "manifest.json").read_text())["fingerprint"] == before["fingerprint"]
    assert summary["rounds"][0]["control_accuracy_after"] == e2e_run["summary"]["rounds"][0]["control_accuracy_after"]
