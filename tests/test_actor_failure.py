"""A generator actor killed in the middle of a sampling pass: Ray restarts it, the pass completes, and no row is
lost or doubled (seeded sampling makes the rows equal to an undisturbed pass's), and the restarted actor serves
the pool's current policy, not the model it was first built with."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.config import EngineConfig, TaskConfig
from raypipe.engines import SamplingSpec
from raypipe.ray_env import init_ray
from raypipe.rollout.generation import EnginePool, generate_rows
from raypipe.rollout.sampling import prompt_rows
from raypipe.tasks import make_task


def _pid(handle: ray.actor.ActorHandle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))


def _next_policy(model_dir: Path, out: Path) -> Path:
    """The same model with other weights (a round's update, for the purpose of this test)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_a_killed_engine_actor_is_restarted_and_the_pass_completes(tiny_model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    init_ray(8)  # the session's Ray: later tests (the e2e run) need its 8 logical CPUs
    policy = _next_policy(tiny_model_dir, tmp_path / "round_1")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    task = make_task(TaskConfig(test_problems=144))
    rows = prompt_rows(list(enumerate(task.splits.test)), tok, task)
    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=32, seed=7)
    pool = EnginePool(EngineConfig(batch_size=4, max_restarts=2))  # 36 batches: the kill lands between them
    try:
        pool.use(str(tiny_model_dir))  # started on one model: the pass below switches it to the policy
        expected = generate_rows(pool, str(policy), rows, spec)
        start = time.perf_counter()
        assert generate_rows(pool, str(policy), rows, spec) == expected, "seeded passes repeat"
        one_pass = time.perf_counter() - start  # warm: the first pass also paid for Ray Data's start
        first_pid = _pid(pool.handles[0])
        result: list[list[dict[str, Any]]] = []
        sampling = threading.Thread(target=lambda: result.append(generate_rows(pool, str(policy), rows, spec)))
        sampling.start()
        time.sleep(0.3 * one_pass)  # a third of the way in: a fixed wait lands after the end on a fast machine
        assert sampling.is_alive(), "the pass ended before the kill: make it longer"
        ray.kill(pool.handles[0], no_restart=False)
        sampling.join(timeout=600)
        assert not sampling.is_alive() and result, "the pass did not complete after the restart"
        assert _pid(pool.handles[0]) != first_pid, "the actor was restarted"
        assert len(result[0]) == len(rows) * spec.n
        assert [(r["qid"], r["sample_idx"]) for r in result[0]] == [(r["qid"], r["sample_idx"]) for r in expected]
        assert [r["completion_ids"] for r in result[0]] == [r["completion_ids"] for r in expected]
    finally:
        pool.shutdown()
