"""Sampling as a Ray Data stage over long-lived, actor-held engines.

`ray.data.llm` starts a fresh engine on every dataset execution (about a minute on CPU), and one round runs many
short passes (sample, several branching levels, evaluations). So the engines live in `EngineActor`s owned by an
`EnginePool` for the whole run, and each pass is a Ray Data `map_batches` whose lightweight tasks forward
batches to them. Between rounds the actors swap weights in place (`load_weights`) instead of restarting.

An engine actor that dies (out of memory, a lost node, a killed process) is restarted by Ray up to
`engine.max_restarts` times and its in-flight batches are retried on it: every call names the model it wants,
so a restarted actor (which Ray builds from its first model) loads the current policy before it samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import ray

from raypipe.config import EngineConfig
from raypipe.engines.base import SamplingSpec, derive_seed

log = logging.getLogger(__name__)


@ray.remote
class EngineActor:
    """Holds one generator for its whole life; the policy changes only through `load_weights`."""

    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        from raypipe.engines import make_generator

        self.generator = make_generator(cfg, model_dir)
        self.model_dir = model_dir

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seeds: list[int] | None,
                 model_dir: str) -> list[list[dict[str, Any]]]:
        self.load_weights(model_dir)
        return [[asdict(c) for c in group] for group in self.generator.generate(prompts, spec, seeds)]

    def load_weights(self, model_dir: str) -> None:
        if model_dir != self.model_dir:
            self.generator.load_weights(model_dir)
            self.model_dir = model_dir

    def sleep(self) -> None:
        self.generator.sleep()
        self.model_dir = None  # the weights are gone: the next load_weights must load, whatever the folder

    def wake_up(self) -> None:
        self.generator.wake_up()


class EnginePool:
    """The run's engine actors, started lazily on first use and pointed at one model directory at a time.
    Colocated engines (engine.colocate) sleep through training stages (`make_room`) and wake on the next use."""

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self.model_dir: str | None = None
        self.handles: list[ray.actor.ActorHandle] = []
        self.asleep = False
        self.refresh_seconds = 0.0
        """Total time spent switching the engines to new weights (waking included): the weight-sync cost."""

    def make_room(self) -> None:
        """Before a training or scoring stage: colocated engines sleep, freeing their GPU memory; otherwise
        nothing (the engines keep their own GPUs)."""
        if self.cfg.colocate and self.handles and not self.asleep:
            start = time.perf_counter()
            ray.get([h.sleep.remote() for h in self.handles])
            self.asleep, self.model_dir = True, None
            log.info("engines asleep in %.1f s", time.perf_counter() - start)

    def use(self, model_dir: str) -> EnginePool:
        """Make every engine serve `model_dir`: start them, or reload weights if they serve another model."""
        model_dir = str(model_dir)
        if self.asleep:
            start = time.perf_counter()
            ray.get([h.wake_up.remote() for h in self.handles])
            self.asleep = False
            self.refresh_seconds += time.perf_counter() - start
        if not self.handles:
            start = time.perf_counter()
            options = {"num_cpus": self.cfg.num_cpus, "num_gpus": self.cfg.num_gpus,
                       "max_restarts": self.cfg.max_restarts, "max_task_retries": self.cfg.max_restarts,
                       "resources": dict(self.cfg.resources)}
            self.handles = [EngineActor.options(**options).remote(self.cfg, model_dir)
                            for _ in range(self.cfg.num_engines)]
            ray.get([h.__ray_ready__.remote() for h in self.handles])
            log.info("started %d %s engine(s) in %.1fs", len(self.handles), self.cfg.backend,
                     time.perf_counter() - start)
        elif model_dir != self.model_dir:
            start = time.perf_counter()
            ray.get([h.load_weights.remote(model_dir) for h in self.handles])
            seconds = time.perf_counter() - start
            self.refresh_seconds += seconds
            log.info("engines switched to %s in %.1f s", "/".join(Path(model_dir).parts[-3:]), seconds)
        self.model_dir = model_dir
        return self

    def shutdown(self) -> None:
        for handle in self.handles:
            ray.kill(handle)
        self.handles, self.model_dir = [], None


def generate_rows(pool: EnginePool, model_dir: str, rows: Sequence[dict[str, Any]],
                  spec: SamplingSpec) -> list[dict[str, Any]]:
    """Sample `spec.n` completions from `model_dir` for every row's `prompt_ids`; other columns are carried through.
    The pool's engines are started, or switched to `model_dir`, first: each call names the model it samples.

    Returns one row per completion (`sample_idx`, `completion_ids`, `completion`, `finish_reason`,
    `num_tokens`), in input order. With `spec.seed` set, row i samples with `derive_seed(spec.seed, i)`.
    """
    if not rows:
        return []
    pool.use(model_dir)
    seeded = spec.seed is not None
    indexed = [{**row, "_row": i, **({"_seed": derive_seed(spec.seed, i)} if seeded else {})}
               for i, row in enumerate(rows)]
    # Tasks, not an actor pool: Ray reuses its idle task workers from one pass to the next, where an actor pool
    # starts (and imports into) a fresh process every pass, about 2 s each on 2 CPUs (benchmarks/sampling.py).
    # Two batches in flight per engine keep it busy while the previous batch's rows are assembled.
    dataset = ray.data.from_items(indexed).map_batches(
        _forward_to_engine,
        fn_kwargs={"handles": pool.handles, "spec": spec, "model_dir": str(model_dir),
                   "batch_size": pool.cfg.batch_size},
        batch_size=pool.cfg.batch_size,
        batch_format="pandas",
        compute=ray.data.TaskPoolStrategy(size=2 * len(pool.handles)),
        num_cpus=0.1,
    )
    out = dataset.to_pandas().sort_values(["_row", "sample_idx"], kind="stable")
    return [{k: _plain(v) for k, v in r.items() if k != "_row"} for r in out.to_dict("records")]


def _forward_to_engine(batch: pd.DataFrame, handles: list[ray.actor.ActorHandle], spec: SamplingSpec,
                       model_dir: str, batch_size: int) -> pd.DataFrame:
    """Ray Data UDF: sends a batch of prompts to one of the pool's engines (batches take turns by position), one
    output row per completion."""
    engine = handles[int(batch["_row"].iloc[0]) // batch_size % len(handles)]
    prompts = [list(map(int, ids)) for ids in batch["prompt_ids"]]
    seeds = [int(s) for s in batch["_seed"]] if "_seed" in batch else None
    groups = ray.get(engine.generate.remote(prompts, spec, seeds, model_dir))
    rows = []
    for record, group in zip(batch.drop(columns="_seed", errors="ignore").to_dict("records"), groups):
        for sample_idx, completion in enumerate(group):
            rows.append({**record, "sample_idx": sample_idx, "completion_ids": completion["token_ids"],
                         "completion": completion["text"], "finish_reason": completion["finish_reason"],
                         "num_tokens": len(completion["token_ids"])})
    return pd.DataFrame(rows)


def _plain(value: Any) -> Any:
    """Arrow hands lists back as numpy arrays; the rest of the pipeline wants plain lists."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (int, float, str)) else value
