"""What every stage of a run shares: its config, artefact store, task, engines, tracker and the policy's
tokenizer, and the helpers stages call (sampling, a training job, token <-> text). The stages themselves are
`raypipe.pipeline.Pipeline`'s methods; this keeps the round loop's module about the rounds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raypipe.artifacts import ArtifactStore, StageResult
from raypipe.config import RunConfig
from raypipe.methods import METHODS
from raypipe.rollout.generation import EnginePool
from raypipe.rollout.sampling import prompt_rows, sample_chains
from raypipe.tasks import Problem, make_task
from raypipe.tasks.checks import check_task
from raypipe.tracking import Tracker
from raypipe.train.trainer import CHECKPOINTS, TrainJob, run_training
from raypipe.update_config import UpdateConfig


def model_dir(stage: StageResult) -> str:
    return stage.metrics["model_dir"]


def carried(stage: StageResult, source: StageResult) -> StageResult:
    """A training stage that took no step hands on its input's model where that is now: a user's model is
    fingerprinted by content, so the manifest of a skipped stage may name where the same weights used to be."""
    if stage.metrics.get("steps"):
        return stage
    return StageResult(stage.dir, {**stage.manifest, "metrics": {**stage.metrics, "model_dir": model_dir(source)}})


def data_path(stage: StageResult) -> Path:
    """A stage's rows: the Parquet folder Ray Data wrote (reference) or the single file `write_rows` wrote."""
    folder = stage.dir / "data"
    return folder if folder.is_dir() else stage.dir / "data.parquet"


class StageContext:
    """The run's shared state. `reuse_from`: other run folders whose matching stages stand in for this run's (see
    ArtifactStore); by default the other runs in the same output_dir (`reuse_runs`). `pool`: engines to borrow (a
    comparison runs many pipelines on one set); by default the run starts its own and shuts them down at the end.
    """

    tracker: Tracker
    init_stage: StageResult
    """Set by the run once round 0's init stage has resolved (the tokenizer comes from its model)."""

    def __init__(self, cfg: RunConfig, reuse_from: Sequence[Path] = (), pool: EnginePool | None = None) -> None:
        self.cfg = cfg
        self.method = METHODS[cfg.method]
        self.run_dir = cfg.run_dir.resolve()
        if not reuse_from and cfg.reuse_runs and self.run_dir.parent.is_dir():
            reuse_from = [d for d in sorted(self.run_dir.parent.iterdir()) if d.is_dir() and d != self.run_dir]
        self.store = ArtifactStore(self.run_dir, reuse_from=[Path(p).resolve() for p in reuse_from])
        self.task = make_task(cfg.task)
        self.splits = self.task.splits
        check_task(cfg, self.task)
        self.owns_pool = pool is None
        self.pool = pool if pool is not None else EnginePool(cfg.engine)
        self._tokenizer: PreTrainedTokenizerBase | None = None

    # ---- helpers -----------------------------------------------------------------------------------------

    def _sample(self, problems: list[tuple[int, Problem]], policy: StageResult,
                seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """`sampling.samples_per_question` chains per problem from `policy`, and the throughput."""
        start = time.perf_counter()
        samples = sample_chains(self.pool, model_dir(policy), prompt_rows(problems, self.tokenizer, self.task),
                                self.cfg.sampling, seed)
        tokens = sum(s["num_tokens"] for s in samples)
        return samples, {"generated_tokens": tokens, "tokens_per_s": tokens / (time.perf_counter() - start)}

    def _schedule(self, settings: UpdateConfig) -> dict[str, Any]:
        """Epochs over the training set, or exactly `round_steps` optimiser steps (cycling the data)."""
        if self.cfg.round_steps is None:
            return {"epochs": settings.epochs, "max_steps": None}
        return {"epochs": 10_000, "max_steps": self.cfg.round_steps}

    def _scoring(self) -> dict[str, Any]:
        """Where and how the frozen-model scoring passes run (reference log-probs, assessment): in the training
        dtype and log-prob path, so the scores are the policy's own at step 0."""
        ref, train = self.cfg.reference, self.cfg.train
        return {"batch_size": ref.batch_size, "num_actors": ref.num_actors, "num_cpus": ref.num_cpus,
                "num_gpus": ref.num_gpus, "use_gpu": train.use_gpu, "bf16": train.bf16,
                "logits_chunk_tokens": train.logits_chunk_tokens}

    def _train(self, job: TrainJob, out: Path, prefix: str) -> dict[str, Any]:
        """Run a training stage's job, checkpointing into the stage's folder the store keeps for a rerun."""
        self.pool.make_room()
        result = run_training(replace(job, checkpoint_dir=str(out / CHECKPOINTS)), self.cfg.train)
        self.tracker.log_training(out / "train_log.jsonl", prefix, result.dev_history)
        return {"model_dir": result.output_dir, "steps": result.steps, "train_seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s, "final": result.metrics, "dev_history": result.dev_history,
                "stop_reason": result.stop_reason, "resumed_from_step": result.resumed_from_step, "dropped": result.dropped,
                "worker_nodes": result.worker_nodes}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (training never changes it, so round 0's serves every round)."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(model_dir(self.init_stage),
                                                            trust_remote_code=self.cfg.engine.trust_remote_code)
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def decode_verbatim(self, ids: list[int]) -> str:
        """The text exactly as the model saw it, chat-template special tokens included."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def step_ends(self, ids: list[int]) -> list[int]:
        """Exclusive token ends of the steps of a completion, as the task cuts them."""
        return self.task.step_ends(ids, self.decode)
