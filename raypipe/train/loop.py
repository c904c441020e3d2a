"""The per-worker body of `run_training`: DeepSpeed on one Ray Train rank, one job after another.

A rank serves the jobs its worker group receives (`serve_jobs`) until told to stop, so the process, its imports
and the process group outlive a training stage. Every rank runs the same number of steps, log intervals and dev
evaluations, so the collectives inside (DeepSpeed's and ours) always line up. The rank's shard (every `world`-th row
of the job's Parquet data) is read into memory once, straight from the file.

Every `checkpoint_every` steps each rank writes its part of a DeepSpeed checkpoint (weights, optimiser, lr schedule)
plus its RNG into the job's checkpoint folder (`raypipe.train.checkpoint`). A rerun of the job starts from the
latest complete one: same step counter, same schedule position, and the batches already trained on are skipped, so
the data order is the uninterrupted run's.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from raypipe.train.checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from raypipe.train.logprobs import load_policy
from raypipe.train.shm_op import clear_stale_build_lock

if TYPE_CHECKING:
    from raypipe.config import OptimConfig, TrainConfig
    from raypipe.train.trainer import DevEval, TrainJob

log = logging.getLogger(__name__)

SUMMARY_FILE = "train_summary.json"
"""Written into the export by rank 0: steps, tokens, train time, last metrics, dev history, stop reason."""
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                    "*.jinja", "*.tiktoken", "spiece.model")
"""What the export copies from the start directory (weights and config come from the trained model)."""


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier for optimiser step `step` (0-based): linear warmup to 1, cosine down to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def micro_batches(per_rank: int, cfg: TrainConfig) -> tuple[int, int]:
    """(rows per forward/backward, forward/backwards per optimiser step) for a per-rank batch of `per_rank`
    rows."""
    micro = min(cfg.micro_batch_size or per_rank, per_rank)
    return micro, math.ceil(per_rank / micro)


def build_ds_config(optim: OptimConfig, cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """DeepSpeed config: torch's AdamW (no JIT-built kernels, so it runs on CPU), the chosen ZeRO stage,
    optionally with the optimiser states offloaded to CPU (torch's AdamW there too: `torch_adam` keeps
    DeepSpeed from building its CPU Adam kernel). Losses arrive already divided by the whole batch's counts
    (`_train_step`), so DeepSpeed's own division by gradient_accumulation_steps is switched off there."""
    micro, steps = micro_batches(optim.batch_size // world_size, cfg)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": steps,
        "train_batch_size": micro * steps * world_size,
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "weight_decay": optim.weight_decay,
                                                  "torch_adam": True}},
        "gradient_clipping": optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


@dataclass
class _Interval:
    """Sums over the steps since the last log line (tensors stay tensors until the log: no per-step sync)."""

    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    loss: torch.Tensor | float = 0.0
    stats: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    """The objective's per-step statistics, summarised by `Objective.summarise` at the log."""


def serve_jobs(config: dict[str, Any]) -> None:
    """Ray Train worker function: set the process up once, then run each job from this rank's inbox (a
    `ray.util.queue.Queue` of `(job, train config, checkpoint_every)`) until it yields None. Rank 0 answers each
    job on the outbox: None when its export is written, or the error's text when the job raised (then every rank
    leaves and the worker group ends)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    inbox, outbox = config["inboxes"][rank], config["outbox"]
    device = ray.train.torch.get_device()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    while (message := inbox.get()) is not None:
        job, cfg, checkpoint_every = message
        try:
            if cfg.use_gpu:
                torch.cuda.set_device(device)
            else:
                torch.set_num_threads(cfg.cpus_per_worker)  # Ray leaves OMP_NUM_THREADS=1 in workers
                clear_stale_build_lock()  # DeepSpeed builds its CPU collective op when the process group starts
            train_job(job, cfg, checkpoint_every, rank, ctx.get_world_size(), device)
        except BaseException as err:
            if rank == 0:
                outbox.put(f"{type(err).__name__}: {err}")
            raise
        finally:  # the next job starts from free memory: DeepSpeed's engine holds reference cycles
            gc.collect()
            if cfg.use_gpu:
                torch.cuda.empty_cache()
        if rank == 0:
            outbox.put(None)


def train_job(job: TrainJob, cfg: TrainConfig, checkpoint_every: int, rank: int, world: int,
              device: torch.device) -> None:
    """One job on this rank: load (resuming from the job's latest checkpoint if any), train, log, evaluate on
    dev, checkpoint, export."""
    import deepspeed
    import ray
    from transformers import AutoTokenizer

    started = time.perf_counter()
    rows, rows_total = _read_rows(job, rank, world)
    read_seconds = time.perf_counter() - started
    n_rows = int(_all_reduce([len(rows)], device, dist.ReduceOp.MIN)[0])
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if n_rows == 0:
        raise ValueError(f"rank {rank} received no training rows from {job.data_path}")
    per_rank = job.optim.batch_size // world
    planned = job.epochs * math.ceil(n_rows / per_rank)
    total = min(planned, job.max_steps) if job.max_steps else planned

    ds_config = build_ds_config(job.optim, cfg, world)
    zero3 = cfg.zero_stage == 3
    if zero3:  # the partitioned load (zero.Init) reads the world size from deepspeed.comm: join Ray Train's group
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    hf_zero3 = _hf_zero3_config(ds_config) if zero3 else None  # keep a reference: transformers holds a weakref
    model = load_policy(job.model_dir, cfg, job.lora, equal_calls=zero3 and world > 1)
    schedule = partial(lr_factor, warmup=job.optim.warmup_steps, total=total, min_ratio=job.optim.min_lr_ratio)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    tokenizer = AutoTokenizer.from_pretrained(job.model_dir, trust_remote_code=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checkpoint = latest_checkpoint(job.checkpoint_dir)
    state = restore_checkpoint(engine, Path(job.checkpoint_dir), checkpoint["tag"], rank, job.log_path) if checkpoint else {}
    resumed_from = state.get("step", 0)
    if rank == 0:
        log.warning("%s: %d rows/rank x %d ranks, batch %d (micro-batches of %d), %d steps, ZeRO-%d%s; "
                    "reading the shard took %.1f s, model + DeepSpeed engine %.1f s", job.kind, n_rows, world,
                    per_rank, ds_config["train_micro_batch_size_per_gpu"], total, cfg.zero_stage,
                    f", resumed at step {resumed_from}" if checkpoint else "", read_seconds,
                    time.perf_counter() - started - read_seconds)

    interval, dev_history, metrics = _Interval(), state.get("dev_history", []), state.get("metrics", {})
    tokens_total, train_seconds = state.get("tokens", 0), state.get("train_seconds", 0.0)
    step, stop_reason = resumed_from, "epochs"
    generator = torch.Generator().manual_seed(job.seed * 1000 + rank)
    batches = itertools.islice(_batches(rows, n_rows, per_rank, job.epochs, generator), resumed_from, None)
    mark = time.perf_counter()  # train time = loop wall time minus dev evaluation (logging included)
    for step, batch in enumerate(batches, start=resumed_from + 1):
        lr = engine.lr_scheduler.get_last_lr()[0]
        _train_step(engine, job, batch, pad_id, interval)
        now = time.perf_counter()
        interval.seconds, mark = interval.seconds + now - mark, now
        if step == 1 or step % cfg.log_every_steps == 0:
            metrics, tokens_total, train_seconds = _log(interval, job, step, total, lr, device, world, rank,
                                                        tokens_total, train_seconds)
            interval = _Interval()
        if job.dev_eval is not None and step % job.dev_eval.every_steps == 0:
            dev_history.append(_evaluate(engine.module.model, tokenizer, job.dev_eval, step, device, rank,
                                         world, synced=zero3 and world > 1))
            mark = time.perf_counter()
            reason = job.dev_eval.should_stop([r["accuracy"] for r in dev_history])
            if reason is not None:
                stop_reason = reason
                break
        if checkpoint_every and step % checkpoint_every == 0 and step < total:
            if interval.steps:  # totals in the checkpoint are exact: log the partial interval first
                metrics, tokens_total, train_seconds = _log(interval, job, step, total, lr, device, world, rank,
                                                            tokens_total, train_seconds)
                interval = _Interval()
            save_checkpoint(engine, rank, Path(job.checkpoint_dir),
                             {"step": step, "tokens": tokens_total, "train_seconds": train_seconds,
                              "metrics": metrics, "dev_history": dev_history})
            mark = time.perf_counter()
        if step >= total:
            stop_reason = "max_steps" if job.max_steps is not None and job.max_steps <= planned else "epochs"
            break
    if interval.steps:
        metrics, tokens_total, train_seconds = _log(interval, job, step, total, lr, device, world, rank,
                                                    tokens_total, train_seconds)
    summary = {"step": step, "tokens": tokens_total, "train_seconds": train_seconds,
               "tokens_per_s": tokens_total / max(train_seconds, 1e-9), "metrics": metrics,
               "dev_history": dev_history, "stop_reason": stop_reason, "resumed_from_step": resumed_from,
               "rows_per_rank": n_rows, "rows_total": rows_total,
               "worker_nodes": nodes}
    _export(engine, job, zero3, rank, summary)
    engine.destroy()
    del hf_zero3


def _hf_zero3_config(ds_config: dict[str, Any]) -> Any:
    """transformers' HfDeepSpeedConfig, so from_pretrained builds the model already partitioned (no full copy per
    rank). It needs `accelerate`; without it each rank loads the full weights and deepspeed.initialize partitions
    them, which is fine for small models."""
    from importlib.metadata import PackageNotFoundError

    from transformers.integrations import HfDeepSpeedConfig

    try:
        return HfDeepSpeedConfig(ds_config)
    except PackageNotFoundError:
        log.warning("accelerate is not installed: ZeRO-3 loads the full model on every rank before partitioning")
        return None


def _read_rows(job: TrainJob, rank: int, world: int) -> tuple[list[tuple], int]:
    """Rows rank, rank + world, ... of the job's Parquet file (or folder) as the objective's row tuples, each
    truncated to `max_length` from the left; and the file's row count.

    Every rank reads the file from the shared run folder itself: Ray Data's streaming split (a coordinator actor
    and read tasks, new processes) took 7-17 s per training stage on 2 cores to hand over a few thousand rows."""
    import pyarrow.parquet as pq

    table = pq.read_table(job.data_path)
    mine = table.take(list(range(rank, table.num_rows, world)))
    return [job.objective.read(r, job.max_length) for r in mine.to_pylist()], table.num_rows


def _batches(rows: list[tuple], n_rows: int, per_rank: int, epochs: int,
             generator: torch.Generator) -> Iterator[list[tuple]]:
    """Per-rank batches of a fresh seeded permutation per epoch; only `n_rows` rows each, so ranks stay in
    step."""
    for _ in range(epochs):
        order = torch.randperm(len(rows), generator=generator)[:n_rows].tolist()
        for i in range(0, n_rows, per_rank):
            yield [rows[j] for j in order[i:i + per_rank]]


def _train_step(engine: Any, job: TrainJob, batch: list[tuple], pad_id: int, acc: _Interval) -> None:
    """One optimiser step on one batch of the objective's rows, in micro-batches of DeepSpeed's micro-batch
    size.

    Each micro-batch's loss is already divided by the whole batch's counts (`Objective.totals`), so the summed
    gradients are the whole batch's: backward does not divide by gradient_accumulation_steps again, and the
    boundary is set by hand, since an epoch's last batch may have fewer micro-batches than the config says.
    Scalar statistics add up over the micro-batches, vectors are concatenated: the log stays per optimiser
    step.
    """
    micro = engine.train_micro_batch_size_per_gpu()
    totals = job.objective.totals(batch)
    parts = [batch[i:i + micro] for i in range(0, len(batch), micro)]
    step_loss, step_stats = 0.0, {}
    for k, part in enumerate(parts):
        engine.set_gradient_accumulation_boundary(k == len(parts) - 1)
        loss, stats = job.objective.step(engine, part, pad_id, totals)
        engine.backward(loss, scale_wrt_gas=False)
        step_loss = step_loss + loss.detach().float()
        for key, value in stats.items():
            step_stats[key] = value if key not in step_stats else (
                step_stats[key] + value if value.dim() == 0 else torch.cat([step_stats[key], value]))
    engine.step()
    acc.steps += 1
    acc.tokens += sum(job.objective.tokens(r) for r in batch)
    acc.loss = acc.loss + step_loss
    for key, value in step_stats.items():
        acc.stats.setdefault(key, []).append(value)


def _all_reduce(values: list[float], device: torch.device, op: Any = dist.ReduceOp.SUM) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def _log(acc: _Interval, job: TrainJob, step: int, total: int, lr: float, device: torch.device, world: int,
         rank: int, tokens_total: int, train_seconds: float) -> tuple[dict[str, float], int, float]:
    """Average the interval over ranks; rank 0 appends the JSON line and prints progress."""
    local = {"loss": float(acc.loss) / acc.steps, **job.objective.summarise(acc.stats)}
    keys = sorted(local)
    summed = _all_reduce([local[k] for k in keys] + [acc.tokens, acc.seconds], device)
    metrics = {k: v / world for k, v in zip(keys, summed)}
    tokens, seconds = int(summed[-2]), summed[-1] / world
    tokens_total, train_seconds = tokens_total + tokens, train_seconds + seconds
    metrics.update(lr=lr, tokens_per_s=tokens / max(seconds, 1e-9))
    line = {"step": step, **metrics, "tokens": tokens_total, "train_seconds": train_seconds}
    if rank == 0:
        if job.log_path:
            Path(job.log_path).parent.mkdir(parents=True, exist_ok=True)
            with open(job.log_path, "a") as f:
                f.write(json.dumps(line) + "\n")
        log.warning("%s step %d/%d  loss %.4f  lr %.2e  %.0f tok/s", job.kind, step, total, metrics["loss"], lr,
                    metrics["tokens_per_s"])
    return metrics, tokens_total, train_seconds


@torch.no_grad()
def _evaluate(model: Any, tokenizer: Any, dev: DevEval, step: int, device: torch.device, rank: int, world: int,
              synced: bool) -> dict[str, float]:
    """Greedy dev accuracy. Each rank decodes an equal slice (ZeRO-3 needs every rank in each forward pass);
    the summed counts give every rank the same accuracy, hence the same stop decision."""
    from raypipe.grading import grade

    start = time.perf_counter()
    n = len(dev.prompts)
    per_rank = math.ceil(n / world)
    slots = range(rank * per_rank, (rank + 1) * per_rank)  # past the end: padding, decoded but not counted
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, per_rank, dev.batch_size):
        chunk = slots[i:i + dev.batch_size]
        enc = tokenizer([dev.prompts[min(j, n - 1)] for j in chunk], return_tensors="pt", padding=True).to(device)
        out = model.generate(**enc, max_new_tokens=dev.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             synced_gpus=synced)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        correct += sum(grade(t, dev.answers[j], dev.kind).correct for j, t in zip(chunk, texts) if j < n)
    model.train(was_training)
    accuracy = _all_reduce([correct], device)[0] / n
    if rank == 0:
        log.warning("dev step %d: accuracy %.3f (%d prompts, %.1f s)", step, accuracy, n,
                    time.perf_counter() - start)
    return {"step": step, "accuracy": accuracy, "seconds": time.perf_counter() - start}


def _export(engine: Any, job: TrainJob, zero3: bool, rank: int, summary: dict[str, Any]) -> None:
    """Rank 0 writes a normal HF directory plus SUMMARY_FILE (ZeRO-3 first gathers the weights on every rank;
    LoRA adapters are merged into the base weights, so the next round's engines load a plain checkpoint)."""
    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if state is not None:  # keys of the TokenLogProbs wrapper: the HF model's own are under `model.`
        state = {k.removeprefix("model."): v for k, v in state.items()}
    if rank == 0:
        out = Path(job.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        module = engine.module.model
        if job.lora is not None and job.lora.rank:
            module = module.merge_and_unload()
        module.save_pretrained(out, state_dict=state)
        for pattern in _TOKENIZER_FILES:
            for src in Path(job.model_dir).glob(pattern):
                shutil.copy2(src, out / src.name)
        (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    dist.barrier()
