"""What a run tells its user: the per-round summary (JSON + table) and an accuracy plot (W&B: raypipe.tracking)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raypipe.artifacts import StageResult
from raypipe.console import terminal
from raypipe.files import write_atomic

ROUND_STAGES = ("sample", "grade", "branch", "correct", "build", "reference", "train", "evaluate", "assessment_data",
                "assess", "control", "evaluate_control")
"""Every stage a round can run, in order (a method runs a subset)."""
PAIR_METHODS = ("dpo", "ipo", "stepdpo")
SUMMARY_COLUMNS = ("accuracy_before", "accuracy_after", "control_accuracy_after", "n_pairs",
                   "mc_exact_agreement", "rollouts_per_pair", "assessment_before", "assessment_after",
                   "corrections_kept", "correction_pass_rate")
EVALUATIONS = {"before": "before", "after": "evaluate", "control": "evaluate_control"}
"""Round summary key `evaluations`: where each of the round's graded test predictions lie (a stage folder with
its rows), so paired comparisons (raypipe.paired) can match them problem by problem."""


def round_summary(r: int, method: str, seconds: dict[str, float],
                  stages: dict[str, StageResult | None]) -> dict[str, Any]:
    """One round's summary row from the stages it ran: `before` (the evaluation the round started from),
    `evaluate`, `build`, `train`, and the optional `evaluate_control`, `branch`, `assess`, `correct` (None when
    the method or the config skipped them). `seconds`: the artefact store's wall time per stage label."""
    def metric(stage: str, key: str) -> Any:
        found = stages.get(stage)
        return found.metrics.get(key) if found is not None else None

    return {"round": r, "method": method, "accuracy_before": metric("before", "accuracy"),
            "accuracy_after": metric("evaluate", "accuracy"),
            "control_accuracy_after": metric("evaluate_control", "accuracy"),
            "n_pairs": metric("build", "rows") if method in PAIR_METHODS else None,
            "n_train_rows": metric("build", "rows"), "train_steps": metric("train", "steps"),
            "localised_fraction": metric("branch", "localised_fraction"),
            "mc_exact_agreement": metric("branch", "mc_exact_agreement"),
            "mc_exact_agreement_localised": metric("branch", "mc_exact_agreement_localised"),
            "rollouts_per_pair": metric("build", "rollouts_per_pair"),
            "assessment_before": metric("assess", "assessment_before"),
            "assessment_after": metric("assess", "assessment_after"),
            "corrections_kept": metric("correct", "kept"),
            "correction_pass_rate": metric("correct", "filter_pass_rate"),
            "weight_refresh_seconds": metric("evaluate", "weight_refresh_seconds"),
            "evaluations": {key: str(stages[stage].dir) for key, stage in EVALUATIONS.items()
                            if stages.get(stage) is not None},
            "stage_seconds": {n: seconds[f"round_{r}/{n}"] for n in ROUND_STAGES if f"round_{r}/{n}" in seconds}}


def warmup_summary(sft: StageResult) -> dict[str, Any] | None:
    """Round 0's SFT as the summary reports it: steps, why it stopped and its dev accuracy curve, so a reader sees
    where on its learning curve the methods started; None where no warm-up ran (a model that needs none)."""
    metrics = sft.metrics
    if not metrics.get("steps"):
        return None
    return {"steps": metrics["steps"], "stop_reason": metrics.get("stop_reason"),
            "final_loss": metrics["final"].get("loss"),
            "dev_accuracy": {str(d["step"]): d["accuracy"] for d in metrics["dev_history"]}}


def write_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / "summary.json"
    write_atomic(path, json.dumps(summary, indent=2))
    return path


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The per-round figures, then the wall time of every stage: one row per figure, one column per round, so the
    tables stay narrow (100 columns) however many figures a method reports. Figures no round has are left out."""
    console = console or terminal()
    rounds = summary["rounds"]
    figures = Table(title=f"raypipe run '{summary['run']}' ({summary['method']})")
    timing = Table(title="stage seconds")
    for table, first in ((figures, "figure"), (timing, "stage")):
        table.add_column(first)
        for row in rounds:
            table.add_column(f"round {row['round']}", justify="right")
    for column in SUMMARY_COLUMNS:
        cells = [format_figure(row[column]) for row in rounds]
        if any(cell != "-" for cell in cells):
            figures.add_row(column, *cells)
    for name in dict.fromkeys(n for row in rounds for n in row["stage_seconds"]):
        timing.add_row(name, *(f"{row['stage_seconds'][name]:.1f}" if name in row["stage_seconds"] else "-"
                               for row in rounds))
    if any(row.get("weight_refresh_seconds") is not None for row in rounds):
        timing.add_row("(weight refresh)", *(format_figure(row.get("weight_refresh_seconds"))
                                             for row in rounds))
    console.print(figures)
    console.print(timing)


def format_figure(value: Any) -> str:
    """A figure as the summary tables show it (the terminal's and the docs'): 3 decimals, '-' for none."""
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
