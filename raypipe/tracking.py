"""W&B tracking of a run: one W&B run per pipeline run, written by the driver alone."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raypipe.artifacts import StageResult
from raypipe.config import RunConfig, to_dict
from raypipe.report import SUMMARY_COLUMNS

if TYPE_CHECKING:
    import wandb


def resolve_mode(mode: str) -> str:
    """The W&B mode a run uses. An explicit `wandb.mode` wins; 'auto' follows WANDB_MODE when it is set (W&B's own
    switch, so `WANDB_MODE=disabled` still turns logging off), else goes online when WANDB_API_KEY is set and
    offline otherwise, so a run without a key never needs a network."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


class Tracker:
    """The run's W&B run, owned by the driver: the only process of a pipeline that calls wandb.

    Training workers never import wandb: rank 0 appends its metrics to the stage's `train_log.jsonl` and the driver
    replays them here when the stage returns. One writer means one W&B run per pipeline run, and Ray Train V2
    rejects Tune's logger callbacks anyway. Every call is a no-op when the mode resolves to 'disabled'.

    Keys: `<trainer>/<metric>` per logged training step (`sft/`, `round_<r>/train/`, `round_<r>/control/`),
    `stage/round_<r>/<stage>/{seconds,<scalar metric>}` as each stage of this run finishes, `round/<field>` per
    round, and the tables `summary` (per round) and `stages` (every stage, executed, skipped or reused).
    """

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.run: wandb.Run | None = None
        self.stages: list[list[Any]] = []
        self.mode = resolve_mode(cfg.wandb.mode)
        if self.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name, mode=self.mode,
                              dir=str(run_dir), config=to_dict(cfg), reinit="finish_previous")
        _step_axis(self.run, "round", "round/round")

    def log_training(self, log_path: Path, prefix: str, dev_history: list[dict[str, float]]) -> None:
        """Replay a trainer's JSONL log (written by rank 0) and its dev evaluations under `prefix/`, plotted
        against the trainer's own `prefix/step`."""
        if self.run is None or not log_path.is_file():
            return
        _step_axis(self.run, prefix, f"{prefix}/step")
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            self.run.log({f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})
        for point in dev_history:
            self.run.log({f"{prefix}/step": point["step"], f"{prefix}/dev_accuracy": point["accuracy"]})

    def log_stage(self, label: str, status: str, stage: StageResult) -> None:
        """`ArtifactStore.on_stage`: a stage's seconds and scalar metrics (rows, tokens_per_s, rollouts_per_s...)
        when it ran in this run. A skipped or reused stage only gets its row in the `stages` table, marked so: its
        seconds are those of the run that made it."""
        seconds = stage.manifest["seconds"]
        self.stages.append([label, status, seconds])
        if self.run is None or status != "executed":
            return
        scalars = {k: v for k, v in stage.metrics.items() if isinstance(v, (int, float))}
        self.run.log({f"stage/{label}/{k}": v for k, v in {"seconds": seconds, **scalars}.items()})

    def log_round(self, row: dict[str, Any]) -> None:
        """A round's summary row (accuracies, pairs, assessment...) under `round/`."""
        if self.run is not None:
            self.run.log({f"round/{k}": v for k, v in row.items() if isinstance(v, (int, float))})

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The per-round summary (the columns of the printed table) and every stage's status as W&B Tables."""
        if self.run is None:
            return
        import wandb

        columns = ["round", "method", *SUMMARY_COLUMNS]
        tables = {"stages": wandb.Table(columns=["stage", "status", "seconds"], data=self.stages)}
        if summary["rounds"]:
            tables["summary"] = wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                                   for r in summary["rounds"]])
        self.run.log(tables)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def _step_axis(run: wandb.Run, prefix: str, step_key: str) -> None:
    """Plot `prefix/*` against `step_key` instead of W&B's global step (each trainer counts its own steps)."""
    run.define_metric(step_key)
    run.define_metric(f"{prefix}/*", step_metric=step_key)
