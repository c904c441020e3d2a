"""`raypipe compare`: every method from the same SFT checkpoint, on the same samples and the same number of
optimiser steps, over several seeds, against SFT continued for those steps (the control).

Each (seed, arm) is an ordinary pipeline run in `runs/<name>/seed_<s>/<arm>/`. The runs share what they have in
common through the artefact store (`reuse_from`): round 0 (SFT, one checkpoint for all seeds, since SFT's seed is
`warmup.seed`), and per seed the round's samples, grades and the control. Runs beside the comparison folder (a
`raypipe run` of the base recipe) and other comparisons' runs count too: a final comparison on test reuses every
stage a selection comparison on dev (`eval.split=dev`) already ran, and grades the same models on test. So every
arm sees exactly the same sampled chains (the same sampling budget); Step-DPO additionally spends branching
rollouts, reported separately. Settings are chosen on the dev split; the reported accuracy is on the test split.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raypipe.config import ConfigError, load_config, load_structured, save_config
from raypipe.console import terminal
from raypipe.files import write_atomic
from raypipe.paired import paired_difference, read_verdicts
from raypipe.ray_env import init_ray
from raypipe.train.worker_group import close_worker_groups

log = logging.getLogger(__name__)


@dataclass
class ArmConfig:
    """One method setting of the comparison."""

    method: str = "stepdpo"
    """Method of the arm (run config `method`)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted run-config overrides of this arm only, e.g. ['aft.constraint=dc']."""
    rounds: int = 1
    """Rounds of this arm; the table compares round 1, later rounds are reported as iteration."""


@dataclass
class CompareConfig:
    """A method comparison: arms x seeds, one shared SFT checkpoint, equal steps."""

    name: str = "compare"
    """Folder under output_dir."""
    output_dir: str = "runs"
    """Where the comparison folder lives."""
    base: str = "conf/quickstart.yaml"
    """Run config every arm starts from."""
    base_overrides: list[str] = field(default_factory=list)
    """Dotted overrides applied to every arm (sizes, engine, ...)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Run seeds: each draws its own (seeded) samples and training order; the SFT checkpoint is the same for
    all."""
    round_steps: int = 40
    """Optimiser steps of every arm's round update and of the control."""
    arms: dict[str, ArmConfig] = field(default_factory=dict)
    """Arm name -> setting. Names become folder names and table rows."""


def load_compare(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    cfg = load_structured(CompareConfig, path, overrides)
    if not cfg.arms:
        raise ConfigError(f"{path}: 'arms' is empty: name at least one method setting to compare")
    if len(set(cfg.seeds)) < 2 or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"{path}: 'seeds' needs at least 2 distinct entries for an interval (got {cfg.seeds})")
    for name, arm in cfg.arms.items():
        if not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{path}: arm name {name!r} must be letters, digits, '-' or '_' (it names a folder)")
        if any(o.startswith("engine.") for o in arm.overrides):
            raise ConfigError(f"{path}: arm '{name}' overrides engine settings; every arm shares one set of "
                              "engines, so set engine.* in base_overrides")
        _arm_config(cfg, name, arm, cfg.seeds[0])  # every arm's run config is checked before anything runs
    return cfg


def _arm_config(cmp: CompareConfig, name: str, arm: ArmConfig, seed: int) -> Any:
    try:
        return load_config(cmp.base, [*cmp.base_overrides, *arm.overrides, f"method={arm.method}",
                                      f"rounds={arm.rounds}", f"seed={seed}", f"round_steps={cmp.round_steps}",
                                      f"output_dir={Path(cmp.output_dir) / cmp.name / f'seed_{seed}'}",
                                      f"name={name}"])
    except ConfigError as err:
        raise ConfigError(f"arm '{name}': {err}") from None


def run_compare(cmp: CompareConfig) -> dict[str, Any]:
    """Run every (seed, arm), then write compare.json, compare.md, compare.png and the resolved comparison
    config (config.yaml) in the comparison folder."""
    from raypipe.pipeline import Pipeline
    from raypipe.rollout.generation import EnginePool

    root = (Path(cmp.output_dir) / cmp.name).resolve()
    runs: list[dict[str, Any]] = []
    first = _arm_config(cmp, *next(iter(cmp.arms.items())), cmp.seeds[0])
    init_ray(first.ray_num_cpus, use_gpu=first.train.use_gpu)
    pool = EnginePool(first.engine)  # one set of engines for every arm: they only swap weights
    try:
        for seed in cmp.seeds:
            for name, arm in cmp.arms.items():
                log.warning("compare: seed %d, arm %s (%s)", seed, name, arm.method)
                cfg = _arm_config(cmp, name, arm, seed)
                siblings = sorted({p for p in [*root.glob("seed_*/*"), *root.parent.glob("*"),
                                               *root.parent.glob("*/seed_*/*")] if p.is_dir() and p != root})
                summary = Pipeline(cfg, reuse_from=siblings, pool=pool).run()
                runs.append({"seed": seed, "arm": name, "method": arm.method, "rounds": summary["rounds"]})
    finally:
        pool.shutdown()
        close_worker_groups()
    result = {**summarise(runs, cmp), "split": first.eval.split}  # graded on test, or on dev in a selection
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(root / "compare.json", json.dumps(result, indent=2))
    write_atomic(root / "compare.md", markdown_table(result))
    save_config(cmp, root / "config.yaml")
    plot_compare(result, root / "compare.png")
    terminal().print(markdown_table(result), markup=False, highlight=False, soft_wrap=True)
    return result


def mean_interval(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean and the Student-t confidence interval of the mean over seeds."""
    from scipy import stats

    n = len(values)
    mean = statistics.fmean(values)
    half = (stats.t.ppf(0.5 + confidence / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)) if n > 1 else 0.0
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "values": values}


def summarise(runs: list[dict[str, Any]], cmp: CompareConfig) -> dict[str, Any]:
    """Per arm: round-1 accuracy (mean and 95% interval over seeds), assessment accuracy, data sizes; plus the
    starting checkpoint, the control, and every later round of the arms that iterate."""
    per_seed: dict[int, dict[str, Any]] = {}  # the start and the control are shared by a seed's arms: one value each
    for run in runs:
        first = run["rounds"][0]
        mine = per_seed.setdefault(run["seed"], {"start": first["accuracy_before"], "control": None})
        # a control is the seed's only if it trained the comparison's steps (an empty training set trains none)
        if mine["control"] is None and first["train_steps"] == cmp.round_steps:
            mine["control"] = first["control_accuracy_after"]
    rows: dict[str, dict[str, Any]] = {
        "start (SFT checkpoint)": {"accuracy": mean_interval([s["start"] for s in per_seed.values()])}}
    controls = [s["control"] for s in per_seed.values() if s["control"] is not None]
    if controls:
        rows["sft continued (control)"] = {"accuracy": mean_interval(controls)}
    for arm in cmp.arms:
        mine = [r for r in runs if r["arm"] == arm]
        if not mine:
            continue
        for k in range(max(len(r["rounds"]) for r in mine)):
            rounds = [r["rounds"][k] for r in mine if len(r["rounds"]) > k]
            label = arm if k == 0 else f"{arm} round {k + 1}"
            rows[label] = {
                "method": mine[0]["method"], "round": k + 1,
                "accuracy": mean_interval([x["accuracy_after"] for x in rounds]),
                "control_accuracy": _mean([x["control_accuracy_after"] for x in rounds]),
                "train_rows": _mean([x["n_train_rows"] for x in rounds]),
                "train_steps": _mean([x["train_steps"] for x in rounds]),
                "assessment_before": _mean([x["assessment_before"] for x in rounds]),
                "assessment_after": _mean([x["assessment_after"] for x in rounds]),
                "rollouts_per_pair": _mean([x["rollouts_per_pair"] for x in rounds]),
                "seconds": _mean([sum(x["stage_seconds"].values()) for x in rounds]),
                "paired_vs_control": _paired(rounds, "after", "control"),
                "paired_vs_previous_round": _paired(rounds, "after", "before") if k else None,
            }
    return {"name": cmp.name, "seeds": list(cmp.seeds), "round_steps": cmp.round_steps, "rows": rows,
            "runs": runs}


def _paired(rounds: list[dict[str, Any]], a: str, b: str) -> dict[str, Any] | None:
    """Evaluation `a` minus evaluation `b` of these rounds (one per seed), problem by problem; None where a round
    lacks either (no control, or a summary from before evaluations were recorded)."""
    found = [r.get("evaluations", {}) for r in rounds]
    if not found or any(a not in e or b not in e for e in found):
        return None
    return paired_difference([(read_verdicts(e[a]), read_verdicts(e[b])) for e in found])


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def markdown_table(result: dict[str, Any]) -> str:
    seeds = len(result["seeds"])
    graded = f"{result['split']} split" if "split" in result else "held-out"  # files before 2026-12-03 lack it
    lines = [f"Greedy accuracy ({graded}) after one round of each method: mean over {seeds} seeds "
             f"and 95% t-interval; every method {result['round_steps']} optimiser steps from the same SFT "
             "checkpoint on the same samples. Assessment: share of (right, wrong) dev chain pairs scored in the "
             "right order, before -> after. 'its control': SFT continued for the same steps from the same "
             "policy (for round 2, from round 1's control). 'minus control': the arm's accuracy minus its control's "
             "on the same problems, mean over seeds with a 95% paired-bootstrap interval over problems.", "",
             "| arm | accuracy | 95% interval | per seed | its control | minus control | train rows | assessment "
             "| rollouts/pair |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, row in result["rows"].items():
        acc = row["accuracy"]
        assessment = (f"{row['assessment_before']:.3f} -> {row['assessment_after']:.3f}"
                      if row.get("assessment_after") is not None else "")
        lines.append(f"| {label} | {acc['mean']:.3f} | [{acc['low']:.3f}, {acc['high']:.3f}] | "
                     f"{', '.join(f'{v:.3f}' for v in acc['values'])} | {_cell(row.get('control_accuracy'), '.3f')} | "
                     f"{_paired_cell(row.get('paired_vs_control'))} | "
                     f"{_cell(row.get('train_rows'), '.0f')} | "
                     f"{assessment} | {_cell(row.get('rollouts_per_pair'), '.1f')} |")
    return "\n".join(lines) + "\n"


def _paired_cell(paired: dict[str, Any] | None) -> str:
    if paired is None:
        return ""
    low, high = paired["ci95"]
    return f"{paired['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def plot_compare(result: dict[str, Any], path: Path) -> Path:
    """Accuracy per arm with its 95% interval; the control and the start as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [k for k in rows if k not in ("start (SFT checkpoint)", "sft continued (control)")]
    means = [rows[k]["accuracy"]["mean"] for k in labels]
    errors = [[m - rows[k]["accuracy"]["low"] for k, m in zip(labels, means)],
              [rows[k]["accuracy"]["high"] - m for k, m in zip(labels, means)]]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(labels), 4))
    ax.bar(range(len(labels)), means, yerr=errors, capsize=4, color="#4c72b0")
    for key, style in (("sft continued (control)", "--"), ("start (SFT checkpoint)", ":")):
        if key in rows:
            ax.axhline(rows[key]["accuracy"]["mean"], linestyle=style, color="black", label=key)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_ylim(max(0.0, min(means + [rows["start (SFT checkpoint)"]["accuracy"]["mean"]]) - 0.15), 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{result['name']}: {len(result['seeds'])} seeds, {result['round_steps']} steps each")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
