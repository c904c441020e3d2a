"""Training throughput: `run_training` (Ray Train + DeepSpeed) against a plain single-process torch loop.

Both train the embedded tiny model on the same synthetic SFT rows with the same batch size, optimiser (AdamW,
clipping, warmup + cosine) and collate code. Steady state: the first `--warmup` optimiser steps are excluded from
both; Ray/DeepSpeed start-up (cluster, workers, model load, engine) and the export are reported separately.
The target is run_training / plain >= 0.8.

    .venv/bin/python -m benchmarks.train_throughput --steps 150 --zero 2    # the defaults: benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from functools import partial
from pathlib import Path

import pandas as pd
import torch

from raypipe.config import ModelConfig, OptimConfig, TaskConfig, TrainConfig
from raypipe.data.synthetic import load_splits
from raypipe.data.tiny_model import save_tiny_model
from raypipe.results import FIGURES_MARK
from raypipe.train.collate import pad_sequences
from raypipe.train.losses import sft_loss, token_logps
from raypipe.train.loop import lr_factor
from raypipe.train.objectives import SFTObjective
from raypipe.train.worker_group import close_worker_groups

RAY_WORKER_NICENESS = 15
"""What raylet gives its workers by default (flag `worker_niceness`)."""


def build_inputs(root: Path) -> tuple[Path, Path, list[tuple[list[int], list[int]]]]:
    """The tiny model (random init) and SFT rows: prompt + solution + EOS, loss on solution + EOS."""
    from transformers import AutoTokenizer

    splits = load_splits(TaskConfig())
    corpus = [p.prompt + p.solution for p in splits["sft"]] + [p.prompt for p in splits["pool"]]
    model_dir = save_tiny_model(ModelConfig(), corpus, root / "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for p in splits["sft"]:
        prompt = tok(p.prompt, add_special_tokens=False)["input_ids"]
        solution = tok(p.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt + solution, [0] * len(prompt) + [1] * len(solution)))
    data = root / "sft.parquet"
    pd.DataFrame([{"input_ids": i, "loss_mask": m} for i, m in rows]).to_parquet(data)
    return model_dir, data, rows


def plain_loop(model_dir: Path, rows: list, optim: OptimConfig, steps: int, warmup: int, threads: int) -> dict:
    """The reference: one process, torch AdamW, no Ray, no DeepSpeed."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, warmup=optim.warmup_steps, total=steps,
                                                           min_ratio=optim.min_lr_ratio))
    gen = torch.Generator().manual_seed(0)
    order: list[int] = []
    tokens = seconds = 0.0
    mark = time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < optim.batch_size:
            order = torch.randperm(len(rows), generator=gen).tolist()
        batch, order = [rows[j] for j in order[:optim.batch_size]], order[optim.batch_size:]
        ids, attn, mask = pad_sequences([r[0] for r in batch], [r[1] for r in batch], pad_id=0)  # the tiny tokenizer's <pad>
        loss = sft_loss(token_logps(model(input_ids=ids, attention_mask=attn, use_cache=False).logits, ids), mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        if step > warmup:
            tokens, seconds = tokens + sum(len(r[0]) for r in batch), seconds + now - mark
        mark = now
    return {"tokens_per_s": tokens / seconds, "final_loss": float(loss.detach())}


def ray_loop(model_dir: Path, data: Path, out: Path, optim: OptimConfig, steps: int, warmup: int,
             zero: int, cpus: int, log_every: int) -> dict:
    """run_training for `steps`; steady state from the cumulative counters of the log lines at `warmup` and end."""
    from raypipe.train.trainer import TrainJob, run_training

    log_path = out / f"zero{zero}.jsonl"
    job = TrainJob(objective=SFTObjective(), model_dir=str(model_dir), output_dir=str(out / f"zero{zero}"),
                   data_path=str(data), optim=optim, epochs=10**6, max_steps=steps, log_path=str(log_path))
    result = run_training(job, TrainConfig(num_workers=1, cpus_per_worker=cpus, zero_stage=zero,
                                           log_every_steps=log_every))
    lines = {line["step"]: line for line in map(json.loads, log_path.read_text().splitlines())}
    first, last = lines[warmup], lines[result.steps]
    steady = (last["tokens"] - first["tokens"]) / (last["train_seconds"] - first["train_seconds"])
    return {"tokens_per_s": steady, "final_loss": last["loss"], "all_steps_tokens_per_s": result.tokens_per_s,
            "overhead_s": result.seconds - result.train_seconds}


def _plain_in_child(niceness: int, *args: object) -> dict:
    """The plain loop in a fresh process at Ray's worker niceness: on a shared machine a nice-0 baseline would
    win CPU time from the (niced) Ray worker and measure the neighbours rather than the loop."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1, initializer=os.nice, initargs=(niceness,)) as pool:
        return pool.apply(plain_loop, args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=10, help="first optimiser steps excluded from both")
    parser.add_argument("--zero", type=int, nargs="+", default=[2], help="ZeRO stages to run")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2, help="torch threads (plain) / CPUs of the worker")
    parser.add_argument("--log-every", type=int, default=0, help="log interval of run_training (default: warmup)")
    parser.add_argument("--niceness", type=int, default=RAY_WORKER_NICENESS,
                        help="niceness of the plain loop (Ray starts its workers at 15)")
    args = parser.parse_args(argv)
    log_every = args.log_every or args.warmup
    if args.warmup % log_every or args.steps % log_every:
        parser.error("--warmup and --steps must be multiples of --log-every")
    optim = OptimConfig(lr=1e-3, warmup_steps=20, batch_size=args.batch_size)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, data, rows = build_inputs(root)
        figures = [f"tiny Llama, {len(rows)} SFT rows, batch {args.batch_size}, {args.steps} steps, fp32; tokens/s "
                   f"over steps {args.warmup + 1}..{args.steps} (first {args.warmup} excluded from both); plain loop "
                   f"at niceness {args.niceness}, run before and after the Ray runs"]
        print(figures[-1], flush=True)
        plain_args = (args.niceness, model_dir, rows, optim, args.steps, args.warmup, args.cpus)
        before = _plain_in_child(*plain_args)
        figures.append(f"plain torch loop ({args.cpus} threads): {before['tokens_per_s']:,.0f} tokens/s "
                       f"(final loss {before['final_loss']:.3f})")
        print(figures[-1], flush=True)

        import ray

        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}})
        results = {zero: ray_loop(model_dir, data, root, optim, args.steps, args.warmup, zero, args.cpus, log_every)
                   for zero in args.zero}
        close_worker_groups()
        ray.shutdown()
        after = _plain_in_child(*plain_args)
        figures.append(f"plain torch loop again: {after['tokens_per_s']:,.0f} tokens/s")
        plain = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
        for zero, r in results.items():
            figures.append(f"run_training ZeRO-{zero} (1 worker, {args.cpus} CPUs): {r['tokens_per_s']:,.0f} tokens/s, "
                           f"ratio to plain (mean of both) {r['tokens_per_s'] / plain:.2f}, to its faster run "
                           f"{r['tokens_per_s'] / max(before['tokens_per_s'], after['tokens_per_s']):.2f}; final loss "
                           f"{r['final_loss']:.3f}; all {args.steps} steps {r['all_steps_tokens_per_s']:,.0f} tokens/s; "
                           f"Ray + DeepSpeed start-up and export {r['overhead_s']:.1f} s (not in tokens/s)")
        print("\n".join(["", FIGURES_MARK, *figures]), flush=True)


if __name__ == "__main__":
    main()
