"""Step-level branching: binary search against a linear scan over the same wrong chains.

A policy that makes errors (the quickstart's SFT checkpoint, trained once by the pipeline's round 0 and cached
under runs/bench/policy) samples chains on pool questions; its distinct wrong chains are localised by the
Monte-Carlo localiser with `branch.search=binary` and `branch.search=linear` (same chains, same K rollouts per
probed prefix, same engine actor, the pipeline's Ray Data stage). Per localised error: rollouts and wall time;
and the share whose first wrong step agrees with the task's exact verifier. Both searches run `--repeats`
times, alternating which goes first, so drift on a shared machine hits both alike; times are each search's
fastest run.

    .venv/bin/python -m benchmarks.branching
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from statistics import mean
from typing import Any

import ray
from transformers import AutoTokenizer

from raypipe.config import RunConfig, load_config
from raypipe.engines.base import derive_seed
from raypipe.results import FIGURES_MARK
from raypipe.rollout.branching import Brancher, WrongChain, branch_row, localisation_metrics
from raypipe.rollout.generation import EnginePool
from raypipe.rollout.sampling import grade_samples, prompt_rows, sample_chains, wrong_chains
from raypipe.tasks import make_task

ROOT = Path(__file__).resolve().parents[1]
POLICY_CONFIG = ROOT / "conf" / "quickstart.yaml"
POLICY_OVERRIDES = ["rounds=0", "name=policy", "wandb.mode=disabled"]
"""The quickstart's round 0 alone (3-operation task, SFT through its 1,500-step schedule): a policy right about 83%
of the time, whose chains have 4 steps, so binary (2 probes) and linear (3 probes) differ. About 9 minutes the
first time; later runs skip every stage (the artefact store's manifests match). `--policy-run runs/quickstart`
takes the demo's checkpoint instead."""


def policy_config(extra: list[str] | None = None) -> RunConfig:
    """The benchmarks' run config: the quickstart's settings with round 0 only, in runs/bench/policy."""
    return load_config(POLICY_CONFIG, [*POLICY_OVERRIDES, f"output_dir={ROOT / 'runs' / 'bench'}", *(extra or [])])


def equal_niceness() -> None:
    """Have Ray start its workers at niceness 0, like the driver and the neighbours' processes. At Ray's default
    (15) they starve whenever a nice-0 process of someone else is busy on a shared machine, and the timings measure
    the neighbours. Takes effect for the next local `ray.init`."""
    os.environ.setdefault("RAY_worker_niceness", "0")


def trained_policy(cfg: RunConfig, run_dir: str | None = None) -> tuple[str, float]:
    """The SFT checkpoint and its held-out accuracy, trained by the pipeline's round 0 unless already on disk;
    or those of an existing run folder (`run_dir`), as they are.

    Leaves Ray running, which the benchmarks then use.
    """
    from raypipe.pipeline import Pipeline
    from raypipe.ray_env import init_ray

    equal_niceness()
    if run_dir is None:
        Pipeline(cfg).run()
    else:
        init_ray(cfg.ray_num_cpus)
    stage = Path(run_dir or cfg.run_dir) / "round_0"
    sft = json.loads((stage / "sft" / "manifest.json").read_text())["metrics"]
    evaluated = json.loads((stage / "evaluate" / "manifest.json").read_text())["metrics"]
    return sft["model_dir"], evaluated["accuracy"]


def localise(chains: list[WrongChain], cfg: RunConfig, search: str, pool: EnginePool, tokenizer: Any,
             seed: int) -> dict[str, Any]:
    """One Brancher pass over every chain; the pipeline's branch stage without the artefact."""
    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    brancher = Brancher(replace(cfg.branch, search=search), pool, pool.model_dir, make_task(cfg.task).is_correct,
                        decode, cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens, seed)
    start = time.perf_counter()
    found = brancher.localise(chains)
    seconds = time.perf_counter() - start
    rows = [branch_row(c, loc) for c, loc in zip(chains, found)]
    localised = [r for r in rows if r["first_wrong"] is not None]
    rollouts = sum(r["rollouts"] for r in rows)
    return {"search": search, "seconds": seconds, "rollouts": rollouts, "localised": len(localised),
            "passes": brancher.passes, "agreement": localisation_metrics(rows, "mc", True)["mc_exact_agreement_localised"],
            "rollouts_per_error": rollouts / max(len(localised), 1),
            "ms_per_error": 1000 * seconds / max(len(localised), 1), "rollouts_per_s": rollouts / seconds,
            "first_wrong": [r["first_wrong"] for r in rows]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=400, help="pool questions sampled for wrong chains")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each search (order alternates)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed of the sampling and rollouts, as the pipeline seeds them")
    parser.add_argument("--policy-run", help="a finished run folder whose round-0 SFT checkpoint to use as it is "
                                             "(default: train or reuse runs/bench/policy)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (e.g. branch.rollouts=16)")
    args = parser.parse_args(argv)

    cfg = policy_config(args.overrides)
    model_dir, accuracy = trained_policy(cfg, args.policy_run)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pool = EnginePool(cfg.engine).use(model_dir)
    try:
        task = make_task(cfg.task)
        problems = list(enumerate(task.splits.pool[: args.questions]))
        start = time.perf_counter()
        samples = sample_chains(pool, model_dir, prompt_rows(problems, tokenizer, task), cfg.sampling,
                                derive_seed(args.seed, "sample"))
        sample_seconds = time.perf_counter() - start
        graded = grade_samples(samples, dict(problems), task)
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

        chains = wrong_chains(graded, lambda ids: task.step_ends(ids, decode), cfg.branch.max_wrong_per_question)
        steps = [c.num_steps for c in chains]
        header = (f"policy {model_dir} (held-out accuracy {accuracy:.3f}); {len(problems)} questions x "
                  f"{cfg.sampling.samples_per_question} samples in {sample_seconds:.1f} s, sample accuracy "
                  f"{mean(g['correct'] for g in graded):.3f}; {len(chains)} distinct wrong chains "
                  f"(at most {cfg.branch.max_wrong_per_question} per question, {mean(steps):.2f} steps on average); "
                  f"K = {cfg.branch.rollouts} rollouts per probed prefix, temperature {cfg.sampling.temperature}; "
                  f"load average {os.getloadavg()[0]:.2f}")
        print(header, flush=True)
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            order = ("binary", "linear") if repeat % 2 == 0 else ("linear", "binary")
            for search in order:
                runs.append({"repeat": repeat, **localise(chains, cfg, search, pool, tokenizer,
                                                          derive_seed(args.seed, "branch", repeat, search))})
                r = runs[-1]
                print(f"  repeat {repeat} {search:6s}: {r['localised']} localised, {r['rollouts']} rollouts in "
                      f"{r['passes']} passes, {r['seconds']:.1f} s, agreement {r['agreement']:.3f}", flush=True)
    finally:
        pool.shutdown()
        ray.shutdown()
    print(f"\n{FIGURES_MARK}\n{header}")
    report(runs, chains)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def report(runs: list[dict[str, Any]], chains: list[WrongChain]) -> None:
    """The table, the ratios, and where the searches disagree with the exact verifier. Counts and agreement are
    means over repeats; times are those of each search's fastest run (on a shared machine the least disturbed)."""
    by = {s: [r for r in runs if r["search"] == s] for s in ("binary", "linear")}
    fastest = {s: min(rs, key=lambda r: r["seconds"]) for s, rs in by.items()}
    avg = {s: {k: mean(r[k] for r in rs) for k in ("localised", "agreement", "rollouts_per_error")}
           for s, rs in by.items()}
    print("\n| search | localised errors | rollouts per error | ms per error | rollouts/s | agreement with exact |")
    print("|---|---|---|---|---|---|")
    for s, a in avg.items():
        agreements = sorted(r["agreement"] for r in by[s])
        print(f"| {s} | {a['localised']:.0f} of {len(chains)} | {a['rollouts_per_error']:.1f} | "
              f"{fastest[s]['ms_per_error']:.0f} | {fastest[s]['rollouts_per_s']:,.0f} | {a['agreement']:.3f} "
              f"({agreements[0]:.3f}-{agreements[-1]:.3f}) |")
    b, lin = avg["binary"], avg["linear"]
    print(f"\nlinear / binary: rollouts per error {lin['rollouts_per_error'] / b['rollouts_per_error']:.2f}x, "
          f"time per error {fastest['linear']['ms_per_error'] / fastest['binary']['ms_per_error']:.2f}x "
          f"(fastest of {len(by['binary'])} runs each: {fastest['binary']['seconds']:.1f} s binary in "
          f"{fastest['binary']['passes']} generation passes, {fastest['linear']['seconds']:.1f} s linear in "
          f"{fastest['linear']['passes']}); agreement with exact {b['agreement']:.3f} (binary) vs "
          f"{lin['agreement']:.3f} (linear)")
    exact = [c.exact_first_wrong for c in chains]
    for s, rs in by.items():
        late = sum(f is not None and e is not None and f > e for r in rs for f, e in zip(r["first_wrong"], exact))
        early = sum(f is not None and e is not None and f < e for r in rs for f, e in zip(r["first_wrong"], exact))
        print(f"{s}: disagreements with exact per run: {late / len(rs):.1f} placed after the true first wrong "
              f"step, {early / len(rs):.1f} before it")


if __name__ == "__main__":
    main()
