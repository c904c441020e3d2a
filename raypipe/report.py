"""What a run tells its user: the per-round summary (JSON + table), an accuracy plot and W&B logging."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raypipe.config import RunConfig, to_dict

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("round", "method", "accuracy_before", "accuracy_after", "control_accuracy_after", "n_pairs",
                   "mc_exact_agreement", "rollouts_per_pair", "assessment_before", "assessment_after")


class Tracker:
    """W&B run of the driver (offline by default); every call is a no-op when mode is 'disabled'."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.run = None
        if cfg.wandb.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.name,
                              mode=cfg.wandb.mode, dir=str(run_dir), config=to_dict(cfg), reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_training(self, log_path: Path, prefix: str) -> None:
        """Replay a trainer's JSONL log (written by rank 0) under `prefix/`."""
        if self.run is None or not log_path.is_file():
            return
        for line in log_path.read_text().splitlines():
            record = json.loads(line)
            self.run.log({f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float))})

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The per-round summary as a W&B Table (the same columns as the printed one)."""
        if self.run is None or not summary["rounds"]:
            return
        import wandb

        columns = list(SUMMARY_COLUMNS)
        self.run.log({"summary": wandb.Table(columns=columns, data=[[r.get(c) for c in columns]
                                                                    for r in summary["rounds"]])})

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The per-round figures, then the wall time of every stage (stages as rows, rounds as columns)."""
    console = console or Console(width=180)
    table = Table(title=f"raypipe run '{summary['run']}' ({summary['method']})")
    for column in SUMMARY_COLUMNS:
        table.add_column(column, justify="right")
    for row in summary["rounds"]:
        table.add_row(*(_fmt(row[c]) for c in SUMMARY_COLUMNS))
    console.print(table)
    timing = Table(title="stage seconds")
    timing.add_column("stage")
    stages: dict[str, list[str]] = {}
    for row in summary["rounds"]:
        timing.add_column(f"round {row['round']}", justify="right")
        for name, seconds in row["stage_seconds"].items():
            stages.setdefault(name, []).append(f"{seconds:.1f}")
    for name, cells in stages.items():
        timing.add_row(name, *cells)
    console.print(timing)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def plot_accuracy(run_dir: Path, summary: dict[str, Any]) -> Path | None:
    """accuracy per round for the method and the continued-SFT control (round 0 = the starting policy); None for
    a run with no round (SFT only)."""
    if not summary["rounds"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary["rounds"]
    xs = [0] + [r["round"] for r in rounds]
    method = [rounds[0]["accuracy_before"]] + [r["accuracy_after"] for r in rounds]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(xs, method, marker="o", label=summary["method"])
    if all(r["control_accuracy_after"] is not None for r in rounds):
        control = [rounds[0]["accuracy_before"]] + [r["control_accuracy_after"] for r in rounds]
        ax.plot(xs, control, marker="s", linestyle="--", label="SFT continued (control)")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
