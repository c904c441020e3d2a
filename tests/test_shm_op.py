"""A killed build of DeepSpeed's CPU collective op must not hang every later training stage."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from raypipe.train.shm_op import OP_NAME, build_lock, clear_stale_build_lock


def _lock(tmp_path: Path, age_seconds: float) -> Path:
    lock = tmp_path / "lock"
    lock.touch()
    then = time.time() - age_seconds
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_removed_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = _lock(tmp_path, age_seconds=3600)
    with caplog.at_level(logging.WARNING):
        assert clear_stale_build_lock(lock, stale_after=600) is True
    assert not lock.exists()
    assert "removed a stale build lock" in caplog.text and str(lock) in caplog.text


def test_a_lock_of_a_build_in_progress_is_left_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lock = _lock(tmp_path, age_seconds=20)
    with caplog.at_level(logging.WARNING):
        assert clear_stale_build_lock(lock, stale_after=600) is False
    assert lock.exists()
    assert "waiting for another process" in caplog.text


def test_no_lock_is_nothing_to_do(tmp_path: Path) -> None:
    assert clear_stale_build_lock(tmp_path / "lock") is False


def test_the_lock_is_where_torch_builds_the_op() -> None:
    lock = build_lock()
    assert lock.name == "lock" and lock.parent.name == OP_NAME
