"""End to end: one quickstart round from an empty run folder, the wall time of every stage and the fixed costs.

Runs `conf/quickstart.yaml` (round 0's SFT, then one Step-DPO round) in a fresh folder under runs/bench/end_to_end
with stage reuse off, then reads the stage timings back from the run's manifests (round 0) and summary.json
(`stage_seconds`, round 1). Fixed costs it can separate: starting Ray, starting the engine actor (once per run:
it lives for the whole run), and the start-up and export of each training stage (the stage's wall time less the
loop's own training and dev-evaluation time, from train_log.jsonl and the manifest). The first training stage
starts the run's Ray Train worker group, which the later ones reuse (`train.keep_workers`): theirs is the model
load, the DeepSpeed engine and the export.

`--policy-run RUN` takes round 0 (the starting policy) from a finished run of the same config and times round 1
only, its first training stage then being the one that starts the worker group.

    .venv/bin/python -m benchmarks.end_to_end
    .venv/bin/python -m benchmarks.end_to_end --policy-run runs/quickstart     # round 1 only, after `make demo`
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import ray

from benchmarks.branching import equal_niceness
from raypipe.config import load_config
from raypipe.pipeline import Pipeline
from raypipe.ray_env import init_ray
from raypipe.results import FIGURES_MARK
from raypipe.rollout.generation import EnginePool
from raypipe.train.worker_group import close_worker_groups

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STAGES = ("sft", "train", "control")
DETAILS = {  # what each stage did, from its manifest's metrics
    "sft": ("steps", "tokens_per_s"), "train": ("steps", "tokens_per_s"), "control": ("steps", "tokens_per_s"),
    "sample": ("generated_tokens", "tokens_per_s"), "assessment_data": ("generated_tokens", "tokens_per_s"),
    "branch": ("wrong_chains", "rollouts", "rollouts_per_s"), "evaluate": ("accuracy", "tokens_per_s"),
    "evaluate_control": ("accuracy", "tokens_per_s"), "build": ("rows",), "reference": ("rows",),
    "sft_data": ("rows",), "grade": ("rows", "sample_accuracy"),
}


class TimedPool(EnginePool):
    """The run's engine pool, noting how long its actors took to start (the first `use`)."""

    start_seconds: float | None = None

    def use(self, model_dir: str) -> EnginePool:
        if self.handles:
            return super().use(model_dir)
        start = time.perf_counter()
        super().use(model_dir)
        self.start_seconds = time.perf_counter() - start
        return self


def round0_only(policy_run: Path, folder: Path) -> Path:
    """A run folder whose only round is `policy_run`'s round 0 (a link), so that reusing from it leaves round 1 to
    run: the whole of `policy_run` would stand in for round 1 too."""
    source = policy_run.resolve() / "round_0"
    if not (source / "sft" / "manifest.json").is_file():
        raise SystemExit(f"--policy-run {policy_run}: no finished round_0/sft there (run `make demo` first)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "round_0").symlink_to(source, target_is_directory=True)
    return folder


def manifest(run_dir: Path, label: str) -> dict[str, Any]:
    return json.loads((run_dir / label / "manifest.json").read_text())


def training_overhead(run_dir: Path, label: str) -> tuple[float, float, float] | None:
    """(stage wall time, loop training time, dev evaluation time) of a training stage; None if it did not train."""
    log = run_dir / label / "train_log.jsonl"
    if not log.is_file():
        return None
    m = manifest(run_dir, label)
    last = json.loads(log.read_text().splitlines()[-1])
    dev = sum(d["seconds"] for d in m["metrics"].get("dev_history") or [])
    return m["seconds"], last["train_seconds"], dev


def detail(metrics: dict[str, Any], stage: str) -> str:
    parts = []
    for key in DETAILS.get(stage, ()):
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{key} {value:,.3f}" if isinstance(value, float) and value < 1 else
                         f"{key} {value:,.0f}")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "conf" / "quickstart.yaml"))
    parser.add_argument("--output-dir", default=str(ROOT / "runs" / "bench" / "end_to_end"),
                        help="a new run folder is made here for every run")
    parser.add_argument("--reuse-from", action="append", default=[],
                        help="run folder whose finished stages with matching fingerprints stand in for this run's "
                             "(default: none, every stage runs)")
    parser.add_argument("--policy-run", help="a finished run folder of the same config whose round-0 stages (the "
                                             "starting policy) stand in for this run's: only round 1 is timed")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args(argv)

    name = time.strftime("%Y%m%d-%H%M%S")
    cfg = load_config(args.config, [*args.overrides, f"output_dir={Path(args.output_dir).resolve()}", f"name={name}",
                                    "reuse_runs=false"])
    reuse_from = [Path(p).resolve() for p in args.reuse_from]
    if args.policy_run:
        reuse_from.append(round0_only(Path(args.policy_run), cfg.run_dir.with_name(f"{name}-policy")))
    equal_niceness()
    load_before = os.getloadavg()
    start = time.perf_counter()
    init_ray(cfg.ray_num_cpus, use_gpu=cfg.train.use_gpu)
    ray_start = time.perf_counter() - start
    pool = TimedPool(cfg.engine)
    try:
        summary = Pipeline(cfg, reuse_from=reuse_from, pool=pool).run()
        wall = time.perf_counter() - start
    finally:
        pool.shutdown()
        close_worker_groups()
        ray.shutdown()
    report(cfg.run_dir, summary, wall, ray_start, pool.start_seconds, load_before, os.getloadavg())


def report(run_dir: Path, summary: dict[str, Any], wall: float, ray_start: float, engine_start: float | None,
           load_before: tuple[float, ...], load_after: tuple[float, ...]) -> None:
    """Round 0 and round 1 stage tables (share of their total), then the fixed costs."""
    stage_seconds = summary["rounds"][0]["stage_seconds"] if summary["rounds"] else {}
    round0 = {label.split("/", 1)[1]: manifest(run_dir, label)["seconds"]
              for label in summary["stages_executed"] if label.startswith("round_0/")}
    print(f"\n{FIGURES_MARK}\nrun {run_dir}: {wall:.1f} s in all (Ray start included); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; reused stages: "
          f"{', '.join(summary['stages_reused']) or 'none'}")
    for title, seconds in (("round 0 (starting policy)", round0), ("round 1", stage_seconds)):
        if not seconds:
            continue
        total = sum(seconds.values())
        r = title.split()[1]
        print(f"\n{title}: {total:.1f} s\n\n| stage | seconds | share | what it did |\n|---|---|---|---|")
        for stage, s in seconds.items():
            metrics = manifest(run_dir, f"round_{r}/{stage}")["metrics"]
            print(f"| {stage} | {s:.1f} | {s / total:.0%} | {detail(metrics, stage)} |")
    counted = sum(round0.values()) + sum(stage_seconds.values())
    print(f"\nfixed costs: Ray start {ray_start:.1f} s; engine actor start "
          f"{'-' if engine_start is None else f'{engine_start:.1f} s'} (once per run, inside its first stage that "
          f"generates); driver outside stages (W&B, summary, plot) {wall - ray_start - counted:.1f} s")
    first = True
    for label in ["round_0/sft", *(f"round_1/{s}" for s in TRAINING_STAGES[1:])]:
        split = training_overhead(run_dir, label)
        if split is not None:
            total, train, dev = split
            print(f"  {label}: {total:.1f} s = training loop {train:.1f} s + dev evaluation {dev:.1f} s "
                  f"+ start-up and export {total - train - dev:.1f} s"
                  f"{' (starts the worker group the later stages reuse)' if first else ''}")
            first = False


if __name__ == "__main__":
    main()
