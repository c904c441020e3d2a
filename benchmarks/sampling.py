"""Sampling throughput: vLLM against transformers `generate`, and the Ray Data stage against its engine actor.

One model (the quickstart's SFT checkpoint, see benchmarks/branching.py: a trained policy, so chains end when the
model says so, as in a real round), the same prompts (`--questions` pool questions of the embedded task), the same
settings (n, temperature, top_p, max_tokens: the quickstart's sampling section) and the same batches
(`engine.batch_size` prompts per call) for every variant:

- vLLM in-process: `VLLMGenerator.generate` called in this process (no Ray in the way);
- transformers in-process: `HFGenerator.generate` in this process (`engine.hf_batch_size` sequences per
  `generate` call);
- engine actor, direct: `ray.get` on the `EnginePool`'s one vLLM actor, batch by batch (what the Ray Data UDF does);
- Ray Data stage: `generate_rows` over the same pool, as every pipeline stage samples.

Generated tokens are counted the same way everywhere: the completion's ids (a stop string's included, EOS not).
Every variant is warmed up once and timed `--repeats` times, in an order that rotates between repeats; tokens/s is
that of its fastest pass (on a shared machine the least disturbed one; the mean is printed too). Ray's workers run
at niceness 0 here, like this process (see `benchmarks.branching.equal_niceness`). Then two 1-token passes (n=1,
max_tokens=1) over the same prompts give the fixed cost of a pass, direct and through Ray Data, and in-process vLLM
runs with one seed per prompt (as the pipeline samples) against unseeded.

    .venv/bin/python -m benchmarks.sampling
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from statistics import mean
from typing import Any

import ray
from transformers import AutoTokenizer

from benchmarks.branching import policy_config, trained_policy
from raypipe.engines.base import Generator, SamplingSpec, derive_seed
from raypipe.grading import grade
from raypipe.results import FIGURES_MARK
from raypipe.rollout.generation import EnginePool, generate_rows
from raypipe.rollout.sampling import prompt_rows
from raypipe.tasks import make_task

Outputs = list[tuple[int, str]]
"""(generated tokens, text) of every completion, prompt by prompt, sample by sample."""


def in_process(generator: Generator, prompts: list[list[int]], spec: SamplingSpec, seeds: list[int] | None,
               batch: int) -> tuple[float, Outputs]:
    """The engine called directly in this process, one `batch` of prompts per call."""
    out: Outputs = []
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        groups = generator.generate(prompts[first:first + batch], spec, seeds[first:first + batch] if seeds else None)
        out += [(len(c.token_ids), c.text) for group in groups for c in group]
    return time.perf_counter() - start, out


def actor_direct(pool: EnginePool, prompts: list[list[int]], spec: SamplingSpec,
                 batch: int) -> tuple[float, Outputs]:
    """The pool's engine actor called with `ray.get`, batch after batch, as the Ray Data UDF calls it."""
    handle, out = pool.handles[0], []
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        groups = ray.get(handle.generate.remote(prompts[first:first + batch], spec, None, pool.model_dir))
        out += [(len(c["token_ids"]), c["text"]) for group in groups for c in group]
    return time.perf_counter() - start, out


def ray_data_stage(pool: EnginePool, rows: list[dict[str, Any]], spec: SamplingSpec) -> tuple[float, Outputs]:
    """The pipeline's sampling stage: a Ray Data `map_batches` pass over the pool."""
    start = time.perf_counter()
    out = generate_rows(pool, pool.model_dir, rows, spec)
    return time.perf_counter() - start, [(r["num_tokens"], r["completion"]) for r in out]


Passes = dict[str, list[tuple[float, Outputs]]]
"""Variant -> (seconds, outputs) of each timed pass."""


def measure(variants: dict[str, Callable[[], tuple[float, Outputs]]], repeats: int) -> Passes:
    """Every variant `repeats` times, the order rotating by one each repeat, so load drift hits all alike."""
    passes: Passes = {name: [] for name in variants}
    names = list(variants)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            passes[name].append(variants[name]())
            print(f"  repeat {repeat} {name}: {passes[name][-1][0]:.1f} s", flush=True)
    return passes


def best_rate(runs: list[tuple[float, Outputs]]) -> float:
    """Generated tokens/s of the fastest pass: on a shared machine the least disturbed one (as timeit reports)."""
    return max(sum(t for t, _ in out) / seconds for seconds, out in runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=256, help="pool questions (prompts)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each variant (order rotates)")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the seeding probe (prompt i: "
                                                           "derive_seed(seed, i), as generate_rows does)")
    parser.add_argument("--policy-run", help="a finished run folder whose round-0 SFT checkpoint to use as it is "
                                             "(default: train or reuse runs/bench/policy)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (sampling.*, engine.*)")
    args = parser.parse_args(argv)

    cfg = policy_config(args.overrides)
    model_dir, accuracy = trained_policy(cfg, args.policy_run)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = make_task(cfg.task)
    rows = prompt_rows(list(enumerate(task.splits.pool[: args.questions])), tokenizer, task)
    prompts, golds = [r["prompt_ids"] for r in rows], [r["gold"] for r in rows]
    s, batch = cfg.sampling, cfg.engine.batch_size
    spec = SamplingSpec(n=s.samples_per_question, temperature=s.temperature, top_p=s.top_p,
                        max_tokens=s.max_new_tokens)
    one_token = replace(spec, n=1, max_tokens=1)
    seeds = [derive_seed(args.seed, i) for i in range(len(prompts))]

    from raypipe.engines.hf import HFGenerator
    from raypipe.engines.vllm import VLLMGenerator

    vllm, hf = VLLMGenerator(cfg.engine, model_dir), HFGenerator(cfg.engine, model_dir)
    pool = EnginePool(cfg.engine).use(model_dir)
    header = (f"policy {model_dir} (held-out accuracy {accuracy:.3f}); {len(prompts)} prompts x n={spec.n}, "
              f"temperature {spec.temperature}, top_p {spec.top_p}, max_tokens {spec.max_tokens}; {batch} prompts per "
              f"call; engine actor: {cfg.engine.num_cpus} CPUs; {args.repeats} repeat(s); load average "
              f"{os.getloadavg()[0]:.2f}")
    print(header, flush=True)
    try:
        variants: dict[str, Callable[[int], tuple[float, Outputs]]] = {  # argument: how many prompts
            "vLLM in-process": lambda k: in_process(vllm, prompts[:k], spec, None, batch),
            "transformers in-process": lambda k: in_process(hf, prompts[:k], spec, None, batch),
            "engine actor, direct": lambda k: actor_direct(pool, prompts[:k], spec, batch),
            "Ray Data stage": lambda k: ray_data_stage(pool, rows[:k], spec),
        }
        for run in variants.values():
            run(8)  # warm-up
        passes = measure({name: partial(run, len(prompts)) for name, run in variants.items()}, args.repeats)
        fixed = measure({"engine actor, direct": lambda: actor_direct(pool, prompts, one_token, batch),
                         "Ray Data stage": lambda: ray_data_stage(pool, rows, one_token)}, args.repeats)
        try:  # last: a failed call may leave the engine unusable
            seeding: Passes | str = measure({
                "unseeded": lambda: in_process(vllm, prompts, spec, None, batch),
                "one seed per prompt": lambda: in_process(vllm, prompts, spec, seeds, batch)}, args.repeats)
        except RuntimeError as err:
            seeding = f"{type(err).__name__}: {err}"
    finally:
        pool.shutdown()
        vllm.close()
        ray.shutdown()
    print(f"\n{FIGURES_MARK}\n{header}")
    report(passes, golds, spec.n, fixed, seeding)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def report(passes: Passes, golds: list[str], n: int, fixed: Passes, seeding: Passes | str) -> None:
    """Tokens/s of each variant's fastest pass (and the mean over passes), the ratios, the fixed cost of a pass
    and the cost of per-prompt seeds."""
    rate = {name: best_rate(runs) for name, runs in passes.items()}
    print("\n| variant | fastest pass, s | generated tokens | tokens/s (fastest) | tokens/s (mean) | "
          "tokens per completion | accuracy |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in passes.items():
        seconds, out = min(runs, key=lambda r: r[0])
        tokens = sum(t for t, _ in out)
        mean_rate = mean(sum(t for t, _ in o) / sec for sec, o in runs)
        correct = mean(grade(text, golds[i // n], "synthetic").correct for _, o in runs
                       for i, (_, text) in enumerate(o))
        print(f"| {name} | {seconds:.2f} | {tokens:,} | {rate[name]:,.0f} | {mean_rate:,.0f} | "
              f"{tokens / len(out):.1f} | {correct:.3f} |")
    vllm, actor, stage = rate["vLLM in-process"], rate["engine actor, direct"], rate["Ray Data stage"]
    fastest = {name: min(sec for sec, _ in runs) for name, runs in passes.items()}
    print(f"\nvLLM / transformers (in-process): {vllm / rate['transformers in-process']:.2f}x; engine actor direct / "
          f"vLLM in-process: {actor / vllm:.2f}; Ray Data stage / engine actor direct: {stage / actor:.2f} "
          f"({fastest['Ray Data stage'] - fastest['engine actor, direct']:+.2f} s per pass)")
    one = {name: min(sec for sec, _ in runs) for name, runs in fixed.items()}
    print(f"fixed cost of a pass (n=1, max_tokens=1, same prompts, fastest of {len(fixed['Ray Data stage'])}): "
          f"direct {one['engine actor, direct']:.2f} s, Ray Data stage {one['Ray Data stage']:.2f} s")
    if isinstance(seeding, str):
        print(f"vLLM in-process with one seed per prompt: failed ({seeding})")
    else:
        seeded, unseeded = best_rate(seeding["one seed per prompt"]), best_rate(seeding["unseeded"])
        print(f"vLLM in-process with one seed per prompt: {seeded:,.0f} tokens/s against {unseeded:,.0f} unseeded "
              f"({seeded / unseeded:.2f}; fastest passes, measured after the rest)")


if __name__ == "__main__":
    main()
