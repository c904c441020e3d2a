"""The one training entry point: Ray Train workers running DeepSpeed, for every method's objective.

`run_training` is called on the driver (after `ray.init`). It hands the job to a Ray Train worker group
(raypipe.train.worker_group: one `TorchTrainer` whose workers run `raypipe.train.loop.serve_jobs`, kept for the
run's later stages), each rank reading its rows of the round's Parquet data. The trained weights come back as a
normal Hugging Face directory with rank 0's summary in it. A job with a `checkpoint_dir` checkpoints there and
resumes from it (raypipe.train.loop).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from raypipe.config import OptimConfig, TrainConfig, WarmupConfig, validate_train
from raypipe.train.objectives import Objective
from raypipe.update_config import LoRAConfig

STOP_REASONS = ("target", "plateau", "max_steps", "epochs")
CHECKPOINTS = "checkpoints"
"""A training stage's checkpoint folder (`TrainJob.checkpoint_dir`), kept when a killed stage is rerun."""


@dataclass
class DevEval:
    """Greedy dev-set evaluation that decides when SFT stops (the WarmupConfig stopping rule)."""

    prompts: list[str]
    answers: list[str]
    kind: str
    """The task's answer kind (`raypipe.tasks.Task.answer_kind`), for `raypipe.grading.grade`."""
    every_steps: int = 100
    target_accuracy: float = 0.6
    plateau_evals: int = 6
    min_improvement: float = 0.01
    min_accuracy: float = 0.2
    max_new_tokens: int = 96
    batch_size: int = 256
    """Prompts per `generate` call on each rank."""

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"{len(self.prompts)} dev prompts but {len(self.answers)} answers")
        if not self.prompts:
            raise ValueError("DevEval needs at least one prompt")
        if self.every_steps <= 0:
            raise ValueError(f"every_steps must be positive, got {self.every_steps}")

    @classmethod
    def from_config(cls, warmup: WarmupConfig, prompts: list[str], answers: list[str], kind: str,
                    max_new_tokens: int) -> DevEval:
        return cls(prompts=prompts, answers=answers, kind=kind, every_steps=warmup.eval_every_steps,
                   target_accuracy=warmup.target_accuracy, plateau_evals=warmup.plateau_evals,
                   min_improvement=warmup.min_improvement, min_accuracy=warmup.min_accuracy,
                   max_new_tokens=max_new_tokens)

    def should_stop(self, accuracies: list[float]) -> str | None:
        """'target', 'plateau' or None after the latest evaluation (`accuracies` is the whole history).

        A plateau needs `plateau_evals` evaluations in a row that did not beat the last real improvement by
        `min_improvement`, at an accuracy of at least `min_accuracy`: a flat 0% is the pre-transition phase.
        """
        if not accuracies:
            return None
        latest = accuracies[-1]
        if latest >= self.target_accuracy:
            return "target"
        reference, since = accuracies[0], 0
        for acc in accuracies[1:]:
            if acc >= reference + self.min_improvement:
                reference, since = acc, 0
            else:
                since += 1
        if since >= self.plateau_evals and latest >= self.min_accuracy:
            return "plateau"
        return None


@dataclass
class TrainJob:
    """One training run: start weights, rows, objective and schedule."""

    objective: Objective
    """What the rows hold and what is minimised (raypipe.train.objectives)."""
    model_dir: str
    output_dir: str
    data_path: str
    """A Parquet file or a directory of Parquet files."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 1
    max_steps: int | None = None
    """Cap on optimiser steps; the cosine schedule spans min(max_steps, epochs * steps_per_epoch)."""
    max_length: int = 256
    """Longest row in tokens; longer rows lose tokens from the left (the reference pass must use the same)."""
    seed: int = 0
    log_path: str | None = None
    """Rank 0 appends one JSON line per log interval here."""
    dev_eval: DevEval | None = None
    lora: LoRAConfig | None = None
    """LoRA adapters instead of full fine-tuning when its rank is > 0; the export is the merged model."""
    checkpoint_dir: str | None = None
    """This job's checkpoint folder: a DeepSpeed checkpoint every `train.checkpoint_every_steps` steps, and a rerun
    resumes from the latest one there, so it must belong to this very job (the pipeline keeps it only under the
    same stage fingerprint, and removes it once the stage is done). None: no checkpoints. Every rank writes its
    part into it: with workers on several nodes it must be on storage they all see."""

    def __post_init__(self) -> None:
        if self.epochs <= 0 or (self.max_steps is not None and self.max_steps <= 0):
            raise ValueError("epochs and max_steps must be positive")

    @property
    def kind(self) -> str:
        return self.objective.name


@dataclass
class TrainResult:
    steps: int
    seconds: float
    """Wall time of `run_training`, Ray and DeepSpeed start-up and the export included."""
    train_seconds: float
    """Time inside optimiser steps (batching, forward, backward, update), dev evaluation excluded."""
    tokens: int
    """Non-pad tokens trained on, all ranks."""
    tokens_per_s: float
    metrics: dict[str, float]
    """The last log interval's metrics (loss, lr, and for dpo the preference metrics)."""
    dev_history: list[dict[str, float]]
    stop_reason: str
    output_dir: str
    resumed_from_step: int
    """The checkpoint's step this run started from (0: from the start weights)."""
    dropped: dict[str, int]
    """Rows left out of every epoch, by reason: `shard_equalise`, so that every rank has as many rows (and steps)."""
    worker_nodes: list[str]
    """The Ray node id each rank ran on, by rank."""


def run_training(job: TrainJob, cfg: TrainConfig) -> TrainResult:
    """Train `job` on Ray Train workers and export the final weights to `job.output_dir` (a normal HF dir).

    The workers are the run's kept worker group for this layout (`train.keep_workers`), or a group of this job's
    own, ended once it is done."""
    import ray

    from raypipe.train.loop import SUMMARY_FILE
    from raypipe.train.worker_group import Layout, WorkerGroup, worker_group

    if job.optim.batch_size % cfg.num_workers:
        raise ValueError(f"batch_size {job.optim.batch_size} is not divisible by {cfg.num_workers} workers")
    if cfg.checkpoint_every_steps < 0:
        raise ValueError(f"checkpoint_every_steps must be >= 0, got {cfg.checkpoint_every_steps}")
    validate_train(cfg)
    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(num_cpus=8)
    out = Path(job.output_dir).resolve()
    group = worker_group(cfg) if cfg.keep_workers else WorkerGroup(Layout.of(cfg))
    try:
        group.run(job, cfg, cfg.checkpoint_every_steps if job.checkpoint_dir else 0)
    finally:
        if not cfg.keep_workers:
            group.close()
    final = json.loads((out / SUMMARY_FILE).read_text())
    return TrainResult(
        steps=final["step"], seconds=time.perf_counter() - start, train_seconds=final["train_seconds"],
        tokens=final["tokens"], tokens_per_s=final["tokens_per_s"], metrics=final["metrics"],
        dev_history=final["dev_history"], stop_reason=final["stop_reason"], output_dir=str(out),
        resumed_from_step=final["resumed_from_step"],
        dropped={"shard_equalise": final["rows_total"] - cfg.num_workers * final["rows_per_rank"]},
        worker_nodes=final["worker_nodes"],
    )
