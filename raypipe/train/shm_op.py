"""DeepSpeed's CPU shared-memory collective op: a stale build lock must not hang training.

On CPU, DeepSpeed JIT-builds its `deepspeed_shm_comm` extension with torch's cpp_extension the first time a process
group starts (and again whenever the build command changes, e.g. another install path). torch guards the build with
a `lock` file in the extension's folder and waits, silently and forever, while that file exists. A build that was
killed (a stopped test, an interrupted run) leaves the file behind, and every later training stage then hangs at
start-up without a message. A real build takes well under a minute here, so a lock much older than that is stale:
remove it, saying so, before DeepSpeed looks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

OP_NAME = "deepspeed_shm_comm"
STALE_AFTER_SECONDS = 600.0
"""A build lock older than this is taken to be left by a killed build (a build takes about 30 s on 2 cores)."""


def build_lock(name: str = OP_NAME) -> Path:
    """Where torch's cpp_extension keeps the build lock of extension `name`."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def clear_stale_build_lock(lock: Path | None = None, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """Remove the op's build lock when it is older than `stale_after` seconds; whether one was removed. A younger
    lock is another process building right now: left alone, with a warning, as torch waits for it."""
    lock = build_lock() if lock is None else lock
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age < stale_after:
        log.warning("waiting for another process to finish building DeepSpeed's %s op (lock %s, %.0f s old)",
                    OP_NAME, lock, age)
        return False
    lock.unlink(missing_ok=True)
    log.warning("removed a stale build lock of DeepSpeed's %s op (%s, %.0f min old): a killed build left it, and "
                "torch would have waited for it forever", OP_NAME, lock, age / 60)
    return True
