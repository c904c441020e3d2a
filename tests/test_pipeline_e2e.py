"""One true end-to-end round on the real stack (Ray Data + vLLM, Ray Train + DeepSpeed), then resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from transformers import AutoModelForCausalLM

from raypipe.pipeline import Pipeline
from raypipe.report import ROUND_STAGES
from raypipe.train.loop import SUMMARY_FILE

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
    sft = json.loads((run_dir / "round_0/sft/manifest.json").read_text())["metrics"]
    stopped = json.loads((Path(sft["model_dir"]) / SUMMARY_FILE).read_text())["stop_reason"]
    assert stopped == "target", "the warm-up stops at the dev target it can reach, not at the step cap"
    assert summary["warmup"] == {"steps": sft["steps"], "stop_reason": "target", "final_loss": sft["final"]["loss"],
                                 "dev_accuracy": {str(d["step"]): d["accuracy"] for d in sft["dev_history"]}}
    assert sft["dev_history"][-1]["accuracy"] >= cfg.warmup.target_accuracy > sft["dev_history"][0]["accuracy"]
    assert round_1["accuracy_before"] >= 0.1
    assert round_1["n_pairs"] > 0 and round_1["rollouts_per_pair"] > 0
    assert round_1["weight_refresh_seconds"] > 0, "the engines switched from the SFT policy to the trained one"
    branched = pq.read_table(run_dir / "round_1/branch/data.parquet").to_pylist()
    checked = [r for r in branched if r["exact_first_wrong"] is not None]
    hits = sum(r["first_wrong"] == r["exact_first_wrong"] for r in checked)
    assert round_1["mc_exact_agreement"] == hits / len(checked) >= 0.4, "MC placement mostly agrees with the checker"
    assert round_1["assessment_before"] > 0.5, "the SFT policy already prefers right chains to wrong ones"
    pairs = pq.read_table(run_dir / "round_1/reference/data").to_pylist()
    assert len(pairs) == round_1["n_pairs"]
    assert {"prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer",
            "ref_chosen_logps", "ref_rejected_logps", "round", "model_version"} <= pairs[0].keys()
    train = json.loads((run_dir / "round_1/train/manifest.json").read_text())["metrics"]
    control = json.loads((run_dir / "round_1/control/manifest.json").read_text())["metrics"]
    assert train["steps"] > 0 and control["steps"] == train["steps"], "the control trains for the same steps"
    logged = [json.loads(line) for line in (run_dir / "round_1/train/train_log.jsonl").read_text().splitlines()]
    assert logged[-1]["rewards/accuracy"] > 0.5, "the policy ends preferring the chosen step of its own pairs"
    assert logged[-1]["loss"] < logged[0]["loss"], "the Step-DPO loss falls"
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
