"""W&B tracking: which mode a run picks, and what the end-to-end run's offline W&B files hold.

The offline run is read back with the installed wandb's own reader of `.wandb` transaction logs, `wandb leet
inspect --json` (one JSON object per record; wandb 0.31 ships no Python reader), and the tables from the run's
`files/` folder: what `wandb sync` would upload, no mocks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from raypipe.config import ConfigError, RunConfig, WandbConfig, load_config
from raypipe.pipeline import Pipeline
from raypipe.report import SUMMARY_COLUMNS
from raypipe.tracking import Tracker, resolve_mode
from tests.test_pipeline_e2e import STEPDPO_STAGES


class OfflineRun:
    """The records of one offline W&B run folder (`<run>/wandb/offline-run-*`)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (log,) = folder.glob("run-*.wandb")
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
                             capture_output=True, text=True, check=True, timeout=300)
        self.records = [json.loads(line) for line in out.stdout.splitlines()]
        self.history: dict[str, list[Any]] = {}
        """Every logged value of each history key, in logging order."""
        for record in self.of_type("history"):
            for key, value in record["history"]["item"].items():
                self.history.setdefault(key, []).append(value)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["type"] == kind]

    def table(self, key: str) -> dict[str, Any]:
        """A logged wandb.Table, from the JSON file its history entry points at."""
        (path,) = self.history[f"{key}.path"]
        return json.loads((self.folder / "files" / path).read_text())


def offline_runs(run_dir: Path) -> list[Path]:
    """Offline W&B runs of a run folder, oldest first (the folder names start with the start time)."""
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_the_offline_run_holds_config_training_stages_rounds_and_tables(e2e_run: dict) -> None:
    cfg, summary = e2e_run["cfg"], e2e_run["summary"]
    run = OfflineRun(offline_runs(cfg.run_dir)[0])  # the fixture's run; a rerun test may have added another
    round_1 = summary["rounds"][0]

    (header,) = run.of_type("run")
    config = header["run"]["config"]["update"]
    assert config["method"] == "stepdpo" and config["rounds"] == 1 and config["name"] == "e2e"
    assert config["sampling"]["questions_per_round"] == cfg.sampling.questions_per_round

    history = run.history
    for prefix, stage in (("sft", "round_0/sft"), ("round_1/train", "round_1/train"),
                          ("round_1/control", "round_1/control")):  # every line rank 0 wrote, replayed
        lines = (cfg.run_dir / stage / "train_log.jsonl").read_text().splitlines()
        assert len(history[f"{prefix}/loss"]) == len(lines) > 0
    assert {"sft/lr", "sft/tokens_per_s", "sft/dev_accuracy", "round_1/train/rewards/accuracy",
            "round_1/train/rewards/margin"} <= history.keys()

    for stage in STEPDPO_STAGES:  # each stage's seconds, logged once, as it finished
        assert history[f"stage/round_1/{stage}/seconds"] == [round_1["stage_seconds"][stage]]
    for stage in ("init", "sft_data", "sft", "evaluate"):
        assert history[f"stage/round_0/{stage}/seconds"][0] > 0
    assert history["stage/round_1/sample/tokens_per_s"][0] > 0
    assert history["stage/round_1/branch/rollouts_per_s"][0] > 0
    assert history["stage/round_1/build/rows"] == [round_1["n_pairs"]]
    assert history["stage/round_1/evaluate/accuracy"] == [round_1["accuracy_after"]]

    for key in ("accuracy_before", "accuracy_after", "control_accuracy_after", "n_pairs", "assessment_after"):
        assert history[f"round/{key}"] == [round_1[key]]

    table = run.table("summary")
    columns = ["round", "method", *SUMMARY_COLUMNS]
    assert table["columns"] == columns
    assert dict(zip(table["columns"], table["data"][0])) == {c: round_1[c] for c in columns}
    stages = {stage: status for stage, status, _ in run.table("stages")["data"]}
    assert stages == {label: "executed" for label in summary["stages_executed"]}
    assert [r["exit"]["exit_code"] for r in run.of_type("exit")] == [0]


def test_a_resumed_run_logs_no_stage_it_skipped(e2e_run: dict) -> None:
    cfg = e2e_run["cfg"]
    before = set(offline_runs(cfg.run_dir))
    summary = Pipeline(cfg).run()
    assert not summary["stages_executed"], "nothing changed, so every stage is skipped"
    (folder,) = set(offline_runs(cfg.run_dir)) - before
    run = OfflineRun(folder)
    assert not [k for k in run.history if k.startswith(("stage/", "sft/", "round_1/"))]
    stages = {stage: status for stage, status, _ in run.table("stages")["data"]}
    assert stages == {label: "skipped" for label in summary["stages_skipped"]}
    assert run.history["round/accuracy_after"] == [summary["rounds"][0]["accuracy_after"]]


def test_auto_mode_is_offline_without_a_key_and_online_with_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert RunConfig().wandb.mode == "auto"
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline" and resolve_mode("disabled") == "disabled", "explicit wins"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled", "W&B's own switch counts as explicit"
    assert resolve_mode("online") == "online"
    with pytest.raises(ConfigError, match="wandb.mode"):
        load_config(None, ["wandb.mode=sometimes"])


def test_a_disabled_tracker_writes_nothing(tmp_path: Path) -> None:
    tracker = Tracker(RunConfig(wandb=WandbConfig(mode="disabled")), tmp_path)
    tracker.log_round({"round": 1, "accuracy_after": 0.5})
    tracker.log_summary({"rounds": []})
    tracker.finish()
    assert tracker.run is None and not (tmp_path / "wandb").exists()
