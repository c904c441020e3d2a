"""A Ray Train worker group that outlives a training stage: one `TorchTrainer.fit` serves every job of a run.

Starting a TorchTrainer costs about 10 s on 2 cores before the first step (a controller actor, the worker
actors, their imports of torch, transformers and DeepSpeed, the process group), paid by every training stage
when each stage has a trainer of its own: twice a round, for the method and the control. Here the fit runs in a
driver thread and its workers (`raypipe.train.loop.serve_jobs`) take jobs from per-rank queues, so a stage after
the first pays only for loading its model and building its DeepSpeed engine. A group is kept per worker layout
(workers, CPUs, GPUs, resources), one at a time; `close_worker_groups` ends it (the pipeline and `raypipe compare`
call it when they finish, and at interpreter exit).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from raypipe.config import TrainConfig

log = logging.getLogger(__name__)

_POLL_S = 0.5
"""How often the driver checks that the group is still alive while it waits for a job."""


@dataclass(frozen=True)
class Layout:
    """What fixes a worker group: the same layout serves any job; another one needs its own group."""

    num_workers: int
    cpus_per_worker: int
    use_gpu: bool
    resources: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, cfg: TrainConfig) -> Layout:
        return cls(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, tuple(sorted(cfg.resources_per_worker.items())))


class WorkerGroup:
    """Ray Train workers waiting for jobs: `run` hands one to every rank and waits for rank 0's answer."""

    def __init__(self, layout: Layout) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
        from ray.util.queue import Queue

        from raypipe.train.loop import serve_jobs

        self.layout = layout
        self.inboxes = [Queue(actor_options={"num_cpus": 0}) for _ in range(layout.num_workers)]
        self.outbox = Queue(actor_options={"num_cpus": 0})
        env_vars = {} if layout.use_gpu else {"DS_ACCELERATOR": "cpu"}
        trainer = TorchTrainer(
            serve_jobs,
            train_loop_config={"inboxes": self.inboxes, "outbox": self.outbox},
            scaling_config=ScalingConfig(num_workers=layout.num_workers, use_gpu=layout.use_gpu,
                                         resources_per_worker={"CPU": layout.cpus_per_worker,
                                                               **dict(layout.resources)}),
            torch_config=TorchConfig(backend="nccl" if layout.use_gpu else "gloo"),
            run_config=RunConfig(name=f"raypipe-workers-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
                                 failure_config=FailureConfig(max_failures=0),
                                 worker_runtime_env={"env_vars": env_vars}),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="raypipe-train-workers", daemon=True)
        self.thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # kept for the job that is waiting: the driver thread raises it
            self.error = err

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def run(self, job: Any, cfg: TrainConfig, checkpoint_every: int) -> None:
        """Run `job` on every rank; return once rank 0 has written its export, or raise the group's error."""
        from ray.util.queue import Empty

        for inbox in self.inboxes:
            inbox.put((job, cfg, checkpoint_every))
        while True:
            try:
                failure = self.outbox.get(timeout=_POLL_S)
            except Empty:
                if not self.alive:
                    raise self.error or RuntimeError("the training worker group ended before the job did") from None
                continue
            if failure is None:
                return
            self.thread.join()  # the ranks leave after a failure: the fit ends with the full traceback
            raise self.error or RuntimeError(failure)

    def close(self) -> None:
        """Let the ranks leave their loop; the fit returns and its actors exit."""
        if self.alive:
            for inbox in self.inboxes:
                inbox.put(None)
            self.thread.join(timeout=60)


_kept: tuple[tuple[str, Layout], WorkerGroup] | None = None
"""The kept group and its key (the driver's Ray node id, its layout): one at a time, since an idle group holds
its workers' CPUs and GPUs, and a new Ray session never finds the last one's group."""


def worker_group(cfg: TrainConfig) -> WorkerGroup:
    """The kept group for `cfg`'s layout in this Ray session, started (ending the one kept before) if there is
    none or the last one died."""
    import ray

    global _kept
    key = (ray.get_runtime_context().get_node_id(), Layout.of(cfg))
    if _kept is not None and _kept[0] == key and _kept[1].alive:
        return _kept[1]
    close_worker_groups()
    group = WorkerGroup(key[1])
    _kept = (key, group)
    return group


def close_worker_groups() -> None:
    """End the kept worker group, if any (before `ray.shutdown`, or when the run is over)."""
    global _kept
    if _kept is not None:
        key, group = _kept
        _kept = None
        if group.alive and ray_session_is(key[0]):
            group.close()


def ray_session_is(node_id: str) -> bool:
    """Ray is up and its driver node is `node_id` (the group's queues live there)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_node_id() == node_id


atexit.register(close_worker_groups)
