"""Resumable training: each rank's part of a DeepSpeed checkpoint plus its RNG, and the marker that says which
checkpoint is complete.

A checkpoint is in force only once rank 0 has written `LATEST` after every rank's part, so a kill mid-write leaves
the previous one. Restoring puts back the weights, optimiser, lr schedule, RNG and the loop's own counters (the
`state` dict), and cuts the metrics log back to the checkpoint's step.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raypipe.files import write_atomic

log = logging.getLogger(__name__)

LATEST = "latest.json"
"""In a job's checkpoint folder: the tag and step of the newest complete checkpoint (written last, by rank 0)."""


def latest_checkpoint(folder: str | None) -> dict[str, Any] | None:
    """The tag and step of the newest complete checkpoint in a job's checkpoint folder, or None."""
    marker = Path(folder) / LATEST if folder else None
    return json.loads(marker.read_text()) if marker is not None and marker.is_file() else None


def save_checkpoint(engine: Any, rank: int, folder: Path, state: dict[str, Any]) -> None:
    """Every rank: its part of DeepSpeed's checkpoint (rank 0 the weights and `state`, each rank its optimiser
    shard) and its RNG state, in `folder/step_<n>`. Once all have written, rank 0 marks it the latest and removes
    the older ones: a kill mid-write leaves the previous checkpoint in force."""
    start = time.perf_counter()
    tag = f"step_{state['step']:07d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state=state, save_latest=False)
    torch.save(_rng_state(), folder / tag / f"rng_rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        write_atomic(folder / LATEST, json.dumps({"tag": tag, "step": state["step"]}))
        for old in folder.glob("step_*"):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
        log.warning("checkpoint at step %d (%.1f s)", state["step"], time.perf_counter() - start)


def restore_checkpoint(engine: Any, folder: Path, tag: str, rank: int, log_path: str | None) -> dict[str, Any]:
    """Load a `save_checkpoint` checkpoint into the engine and this rank's RNG; return its state. Rank 0 cuts the
    log back to the checkpoint's step, so the steps trained again are not logged twice."""
    _, state = engine.load_checkpoint(str(folder), tag=tag)
    rng = torch.load(folder / tag / f"rng_rank{rank}.pt")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])
    if rank == 0 and log_path and Path(log_path).is_file():
        lines = Path(log_path).read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= state["step"]]
        Path(log_path).write_text("".join(line + "\n" for line in kept))
    return state


def _rng_state() -> dict[str, torch.Tensor]:
    """torch's CPU RNG, and the current GPU's when there is one (dropout draws from them)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state
