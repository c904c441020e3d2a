"""Shared fixtures: a tiny model and tokenizer built once per test session, offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raypipe.config import ModelConfig, TaskConfig
from raypipe.data.synthetic import load_splits
from raypipe.data.tiny_model import save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def task_cfg() -> TaskConfig:
    return TaskConfig(sft_problems=200, pool_questions=200, dev_problems=50, test_problems=50)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, task_cfg: TaskConfig) -> Path:
    """An untrained tiny Llama + tokenizer (random weights) as a normal HF directory."""
    splits = load_splits(task_cfg)
    corpus = [p.prompt + p.solution for p in splits["sft"]] + [p.prompt for p in splits["pool"]]
    return save_tiny_model(ModelConfig(), corpus, tmp_path_factory.mktemp("tiny_model"))
