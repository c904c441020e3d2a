"""DPO throughput: raypipe's DPO update against TRL 1.16's `DPOTrainer` on the same step-level pairs.

Seven contenders train the embedded tiny model (random init, fp32) on the same Step-DPO-shaped pairs (prompt +
correct steps so far, correct next step as chosen, that step with a wrong result as rejected; no EOS) with the same
batch size, steps, optimiser settings and sigmoid loss (beta 0.1). Each runs in a fresh process of its own:

    trl-live           TRL `DPOTrainer`, reference model forward every step (TRL's default)
    trl-precomputed    TRL `DPOTrainer(precompute_ref_log_probs=True)`
    raypipe            `run_training` (Ray Train + DeepSpeed ZeRO-2, 1 worker) on the reference stage's Parquet
    raypipe-packed     the same with `train.packing`: each batch's sequences packed into rows, not padded
    raypipe-shared     packed, and with `train.share_prefix`: each pair's common prefix run once
    plain-precomputed  raypipe's `PreferenceObjective` in a single-process torch loop, reference precomputed
    plain-live         the same loop with a frozen reference model's forward every step: what a live reference costs

TRL gets the very token ids raypipe trains on (its own preprocessing would append EOS to every step), so every
contender scores identical sequences. Steady state: the first `--warmup` steps are excluded from all; start-up
(model load, TRL's dataset preparation, Ray, DeepSpeed, reference passes) is reported apart. Every contender runs
`--rounds` times, in alternating order, and its fastest round is reported: on a shared machine other jobs only
ever slow a run down.

    .venv/bin/python -m benchmarks.dpo_vs_trl      # defaults = benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.dpo_inputs import Pair, Settings, build_inputs
from raypipe.config import TrainConfig
from raypipe.results import FIGURES_MARK
from raypipe.train.collate import pad_sequences
from raypipe.train.loop import lr_factor
from raypipe.train.logprobs import TokenLogProbs
from raypipe.train.losses import sequence_logps, token_logps
from raypipe.train.objectives import PreferenceObjective
from raypipe.train.worker_group import close_worker_groups

TRL_VERSION = "1.16.0"
TRL_DIR = Path(__file__).resolve().parent / ".deps"
"""TRL lives here, outside .venv and the project's dependencies: the benchmark's peer, not something raypipe uses."""
CONTENDERS = ("trl-live", "trl-precomputed", "raypipe", "raypipe-packed", "raypipe-shared", "plain-precomputed",
              "plain-live")


def peak_rss_mib() -> float:
    """VmHWM of this process: the peak resident set size since it started."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _clock() -> tuple[float, float]:
    """(wall, CPU time of this process's threads): the CPU seconds barely depend on what else the machine runs."""
    return time.perf_counter(), time.process_time()


def _figures(pairs: int, tokens: float, padded: float, seconds: float, cpu_seconds: float) -> dict[str, float]:
    return {"pairs_per_s": pairs / seconds, "tokens_per_s": tokens / seconds, "padded_tokens_per_s": padded / seconds,
            "tokens_per_cpu_s": tokens / cpu_seconds}


def import_trl() -> Any:
    """TRL from benchmarks/.deps, with the way to install it when it is missing."""
    if str(TRL_DIR) not in sys.path:
        sys.path.insert(0, str(TRL_DIR))
    try:
        import trl
    except ImportError as err:
        raise SystemExit(f"TRL {TRL_VERSION} is not installed for the benchmarks ({err}): run `make bench`, or "
                         f"`.venv/bin/python -m pip install --no-deps --target benchmarks/.deps trl=={TRL_VERSION}`")
    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"benchmarks/.deps holds TRL {trl.__version__}, the benchmark pins {TRL_VERSION}")
    return trl


def trl_run(model_dir: Path, pairs: list[Pair], s: Settings, precompute: bool, out: str) -> dict[str, Any]:
    """TRL's DPOTrainer as documented (fp32, no gradient checkpointing, CPU), fed raypipe's token ids."""
    torch.set_num_threads(s.threads)
    trl = import_trl()
    from datasets import Dataset
    from transformers import AutoTokenizer, PrinterCallback, TrainerCallback

    class PretokenizedDPOTrainer(trl.DPOTrainer):
        """Skips TRL's text preprocessing, which would append EOS to every step: the rows are already tokenized."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    class StepClock(TrainerCallback):
        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.marks = [_clock()]

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.marks.append(_clock())

    data = Dataset.from_list([{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids,
                               "rejected_ids": p.rejected_ids} for p in pairs])
    args = trl.DPOConfig(
        output_dir=out, per_device_train_batch_size=s.batch_size, max_steps=s.steps, learning_rate=s.optim.lr,
        lr_scheduler_type="cosine", warmup_steps=s.optim.warmup_steps, weight_decay=s.optim.weight_decay,
        max_grad_norm=s.optim.max_grad_norm, beta=s.beta, loss_type=["sigmoid"], max_length=s.max_length,
        precompute_ref_log_probs=precompute, use_cpu=True, bf16=False, gradient_checkpointing=False,
        logging_steps=s.warmup, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    clock = StepClock()
    start = time.perf_counter()
    trainer = PretokenizedDPOTrainer(model=str(model_dir), args=args, train_dataset=data, callbacks=[clock],
                                     processing_class=AutoTokenizer.from_pretrained(model_dir))
    setup = time.perf_counter() - start
    batches: list[tuple[int, int]] = []  # (non-pad, padded) tokens of each training batch, in order
    collate = trainer.data_collator

    def counted(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        batches.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counted
    trainer.remove_callback(PrinterCallback)  # TRL's per-log dict printout; the final loss is read back below
    trainer.train()
    window = batches[s.warmup:s.steps]
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][-1]
    (wall0, cpu0), (wall1, cpu1) = clock.marks[s.warmup], clock.marks[s.steps]
    return {**_figures((s.steps - s.warmup) * s.batch_size, sum(b[0] for b in window), sum(b[1] for b in window),
                       wall1 - wall0, cpu1 - cpu0),
            "setup_s": setup, "final_loss": loss, "peak_rss_mib": peak_rss_mib()}


def _reference_logps(model: Any, batch: list[Pair]) -> list[tuple[float, float]]:
    """Summed log-probs of each pair's chosen and rejected step under `model`, as raypipe's reference pass does."""
    rows = [p.row() for p in batch]
    ids, attn, mask = pad_sequences([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
                                    [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows], pad_id=0)
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logps = sequence_logps(token_logps(logits, ids), mask).tolist()
    return list(zip(logps[:len(batch)], logps[len(batch):]))


def plain_run(model_dir: Path, pairs: list[Pair], s: Settings, live: bool) -> dict[str, Any]:
    """raypipe's objective in one process with torch AdamW: reference log-probs precomputed, or live each step."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(s.threads)
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().requires_grad_(False)
    objective = PreferenceObjective("sigmoid", s.beta)
    refs = [(0.0, 0.0)] * len(pairs) if live else [ref for i in range(0, len(pairs), 2 * s.batch_size)
                                                  for ref in _reference_logps(reference, pairs[i:i + 2 * s.batch_size])]
    rows = [objective.read({**p.row(), "ref_chosen_logps": c, "ref_rejected_logps": r}, s.max_length)
            for p, (c, r) in zip(pairs, refs)]
    if not live:
        del reference  # what precomputing buys: training holds one model
    setup = time.perf_counter() - start
    scorer = TokenLogProbs(policy, TrainConfig.logits_chunk_tokens)  # raypipe's log-prob path, as its trainer
    opt = torch.optim.AdamW(policy.parameters(), lr=s.optim.lr, weight_decay=s.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=s.optim.warmup_steps, total=s.steps,
                                                           min_ratio=s.optim.min_lr_ratio))
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    tokens = padded = seconds = cpu_seconds = 0.0
    mark, cpu_mark = _clock()
    for step in range(1, s.steps + 1):
        if len(order) < s.batch_size:
            order = torch.randperm(len(pairs), generator=gen).tolist()
        picked, order = order[:s.batch_size], order[s.batch_size:]
        batch = [rows[j] for j in picked]
        if live:
            live_refs = _reference_logps(reference, [pairs[j] for j in picked])
            batch = [(*row[:4], c, r) for row, (c, r) in zip(batch, live_refs)]
        loss, _ = objective.step(scorer, batch, pad_id=0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), s.optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now, cpu_now = _clock()
        if step > s.warmup:
            tokens += sum(objective.tokens(r) for r in batch)
            padded += 2 * len(batch) * max(max(len(r[0]), len(r[2])) for r in batch)
            seconds, cpu_seconds = seconds + now - mark, cpu_seconds + cpu_now - cpu_mark
        mark, cpu_mark = now, cpu_now
    return {**_figures((s.steps - s.warmup) * s.batch_size, tokens, padded, seconds, cpu_seconds), "setup_s": setup,
            "final_loss": float(loss.detach()), "peak_rss_mib": peak_rss_mib()}


@dataclass
class MeasuredPreference(PreferenceObjective):
    """raypipe's preference objective, unchanged, plus what only the Ray worker can see: each step's padded
    tokens, the worker process's CPU seconds so far and its own peak RSS, logged with the other metrics."""

    def step(self, engine: Any, batch: list[tuple], pad_id: int,
             totals: dict[str, int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, stats = super().step(engine, batch, pad_id, totals)
        width = max(max(len(r[0]), len(r[2])) for r in batch)
        return loss, {**stats, "padded_tokens": torch.tensor(2.0 * len(batch) * width)}

    def summarise(self, stats: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        rest = {k: v for k, v in stats.items() if k != "padded_tokens"}
        return {**super().summarise(rest), "padded_tokens": float(torch.stack(stats["padded_tokens"]).sum()),
                "cpu_seconds": time.process_time(), "peak_rss_mib": peak_rss_mib()}


def raypipe_run(model_dir: Path, pairs: list[Pair], s: Settings, out: str, packing: bool = False,
                share_prefix: bool = False) -> dict[str, Any]:
    """The pipeline's path: the reference stage (Ray Data) writes ref log-probs, then `run_training` (with
    `train.packing` when `packing`: each batch's sequences packed side by side instead of padded; with
    `train.share_prefix` when `share_prefix`: each pair's common prefix run once)."""
    import ray

    from raypipe.train.reference import add_reference_logps
    from raypipe.train.trainer import TrainJob, run_training

    root = Path(out)
    pd.DataFrame([p.row() for p in pairs]).to_parquet(root / "pairs.parquet")
    start = time.perf_counter()
    os.environ["RAY_worker_niceness"] = "0"  # the worker at this process's niceness, like the other contenders
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    add_reference_logps(ray.data.read_parquet(str(root / "pairs.parquet")), str(model_dir),
                        max_length=s.max_length).repartition(1).write_parquet(str(root / "reference"))
    referenced = time.perf_counter()
    log_path = root / "train_log.jsonl"
    job = TrainJob(objective=MeasuredPreference("sigmoid", s.beta), model_dir=str(model_dir),
                   output_dir=str(root / "trained"), data_path=str(root / "reference"), optim=s.optim,
                   epochs=10**6, max_steps=s.steps, max_length=s.max_length, log_path=str(log_path))
    result = run_training(job, TrainConfig(num_workers=1, cpus_per_worker=s.threads, zero_stage=2,
                                           log_every_steps=s.warmup, packing=packing,
                                           share_prefix=share_prefix))
    close_worker_groups()
    ray.shutdown()
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    first, last = next(x for x in lines if x["step"] == s.warmup), lines[-1]
    padded = sum(x["padded_tokens"] for x in lines if x["step"] > s.warmup)
    return {**_figures((last["step"] - s.warmup) * s.batch_size, last["tokens"] - first["tokens"], padded,
                       last["train_seconds"] - first["train_seconds"], last["cpu_seconds"] - first["cpu_seconds"]),
            "final_loss": last["loss"], "peak_rss_mib": last["peak_rss_mib"], "ray_init_s": started - start,
            "reference_s": referenced - started, "setup_s": result.seconds - result.train_seconds}


def _child_init(niceness: int) -> None:
    """At the shared niceness; no progress bars (transformers' loads, TRL's reference pass, datasets' maps)."""
    from transformers.utils import logging as hf_logging

    os.nice(niceness)
    os.environ["TQDM_DISABLE"] = "1"
    hf_logging.disable_progress_bar()


def run_contender(name: str, model_dir: Path, pairs: list[Pair], s: Settings, niceness: int,
                  root: Path) -> dict[str, Any]:
    """`name` in a fresh spawned process: peak RSS is that process's own, and every contender (Ray's worker too)
    runs at `niceness`, so on a shared machine none gets a larger share of the CPUs than another."""
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    call: Callable[..., dict[str, Any]] = {
        "trl-live": partial(trl_run, precompute=False, out=str(out)),
        "trl-precomputed": partial(trl_run, precompute=True, out=str(out)),
        "raypipe": partial(raypipe_run, out=str(out)),
        "raypipe-packed": partial(raypipe_run, out=str(out), packing=True),
        "raypipe-shared": partial(raypipe_run, out=str(out), packing=True, share_prefix=True),
        "plain-precomputed": partial(plain_run, live=False),
        "plain-live": partial(plain_run, live=True),
    }[name]
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_child_init,
                             initargs=(niceness,)) as pool:
        return pool.submit(call, model_dir, pairs, s).result()


def _report(results: dict[str, dict[str, Any]], s: Settings) -> None:
    print(f"\n{'contender':<19} {'pairs/s':>8} {'tokens/s':>9} {'padded tok/s':>13} {'tok/CPU-s':>10} "
          f"{'peak RSS MiB':>13} {'start-up s':>11} {'final loss':>10}")
    for name, r in results.items():
        print(f"{name:<19} {r['pairs_per_s']:>8.1f} {r['tokens_per_s']:>9,.0f} {r['padded_tokens_per_s']:>13,.0f} "
              f"{r['tokens_per_cpu_s']:>10,.0f} {r['peak_rss_mib']:>13,.0f} {r['setup_s']:>11.1f} "
              f"{r['final_loss']:>10.4f}")
    print(f"\nOver steps {s.warmup + 1}..{s.steps}. tokens: non-pad tokens of the chosen and rejected sequences (the "
          "prompt counted in both), TRL's own `num_tokens` and raypipe's `tokens`; padded: 2 x pairs x the batch's "
          "longest sequence; tok/CPU-s: tokens per CPU second of the training process (all its threads), which "
          "depends little on other jobs; peak RSS: VmHWM of the process that trains (for raypipe the Ray Train "
          "worker; Ray's daemons and driver are not counted); start-up: model load and TRL's trainer set-up (its "
          "reference pass when precomputing), raypipe's Ray Train + DeepSpeed start-up and export.")
    for name in ("raypipe", "raypipe-packed", "raypipe-shared"):
        if name not in results:
            continue
        r = results[name]
        print(f"{name} also spent: ray.init {r['ray_init_s']:.1f} s, reference stage (Ray Data) "
              f"{r['reference_s']:.1f} s")
    pairs = [("raypipe", "trl-live"), ("raypipe", "trl-precomputed"), ("raypipe-packed", "trl-precomputed"),
             ("raypipe-shared", "trl-precomputed"), ("raypipe-packed", "raypipe"),
             ("raypipe-shared", "raypipe-packed"), ("plain-live", "trl-live"),
             ("plain-precomputed", "trl-precomputed"), ("raypipe", "plain-precomputed"),
             ("plain-precomputed", "plain-live"), ("trl-precomputed", "trl-live")]
    for a, b in pairs:
        if a in results and b in results:
            x, y = results[a], results[b]
            print(f"{a} / {b}: {x['tokens_per_s'] / y['tokens_per_s']:.2f}x tokens/s, "
                  f"{x['pairs_per_s'] / y['pairs_per_s']:.2f}x pairs/s, "
                  f"{x['tokens_per_cpu_s'] / y['tokens_per_cpu_s']:.2f}x tokens per CPU second")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dpo_vs_trl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per optimiser step")
    parser.add_argument("--steps", type=int, default=96, help="optimiser steps (96 = 3 epochs of 512 pairs)")
    parser.add_argument("--warmup", type=int, default=16,
                        help="first steps excluded from all; also raypipe's and TRL's log interval")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads / CPUs of the Ray worker. 1: on a shared machine, two threads of such "
                             "small ops spend most of their time waiting for each other; 2 on an idle one")
    parser.add_argument("--niceness", type=int, default=0,
                        help="of every contender, Ray's training worker included (raylet's default would be 15)")
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--rounds", type=int, default=3, help="runs of every contender; the fastest is reported")
    args = parser.parse_args(argv)
    if args.warmup <= 0 or args.steps % args.warmup:
        parser.error("--steps must be a multiple of --warmup (raypipe logs every --warmup steps)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if any(c.startswith("trl") for c in args.contenders):
        import_trl()  # fail before any work
    s = Settings(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, threads=args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        _child_init(0)
        root = Path(tmp)
        model_dir, pairs = build_inputs(root, args.pairs)
        lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in pairs]
        header = (f"tiny Llama (1.1M parameters, fp32, random init), {len(pairs)} step-level pairs (sequences of "
                  f"{min(lengths)}-{max(lengths)} tokens), batch {s.batch_size} pairs, {s.steps} steps, sigmoid DPO "
                  f"beta {s.beta}, AdamW lr {s.optim.lr}; {s.threads} thread(s) each; {args.rounds} round(s), "
                  "alternating the order")
        print(header, flush=True)
        runs: dict[str, list[dict[str, Any]]] = {}
        for k in range(args.rounds):
            for name in args.contenders if k % 2 == 0 else args.contenders[::-1]:
                r = run_contender(name, model_dir, pairs, s, args.niceness, root / f"{k}")
                runs.setdefault(name, []).append(r)
                print(f"round {k + 1}, {name}: {r['pairs_per_s']:.1f} pairs/s, {r['tokens_per_s']:,.0f} tokens/s, "
                      f"{r['tokens_per_cpu_s']:,.0f} tokens/CPU-s", flush=True)
    results = {name: max(rs, key=lambda r: r["tokens_per_s"]) for name, rs in runs.items()}
    print(f"\n{FIGURES_MARK}\n{header}")
    if args.rounds > 1:
        print("\nEach contender's fastest round (other jobs only ever slow a run down); pairs/s over the rounds: " +
              "; ".join(f"{n} {min(r['pairs_per_s'] for r in rs):.1f}-{max(r['pairs_per_s'] for r in rs):.1f}"
                        for n, rs in runs.items()))
    _report(results, s)
    return results


if __name__ == "__main__":
    # under its importable name, which spawned processes and Ray workers unpickle functions and classes by
    from benchmarks.dpo_vs_trl import main as _main

    _main()
