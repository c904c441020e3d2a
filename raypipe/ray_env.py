"""Starting Ray the same way for the pipeline, `raypipe eval` and the tests."""

from __future__ import annotations

import os

import ray

_WORKER_ENV = ("HF_HUB_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "VLLM_ENABLE_V1_MULTIPROCESSING",
               "DS_ACCELERATOR", "VLLM_CPU_KVCACHE_SPACE")


def init_ray(num_cpus: int, use_gpu: bool = False) -> None:
    """Connect to the cluster of `ray job submit` (RAY_ADDRESS) or start a local one.

    Actors get their environment only through the runtime_env: offline hub, in-process vLLM and DeepSpeed's CPU
    accelerator on CPU machines.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not use_gpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    env = {k: os.environ[k] for k in _WORKER_ENV if k in os.environ}
    runtime_env = {"env_vars": env}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
    else:
        # the dashboard serves the State API, which Ray Train's placement-group cleaner polls
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, log_to_driver=True)
