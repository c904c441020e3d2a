"""Stage artefacts: every stage writes Parquet plus a JSON manifest under `runs/<run>/round_<r>/<stage>/`.

The manifest records the stage's fingerprint (the code that made it, its config and its inputs' fingerprints), row
counts, the model version and timings. A stage whose manifest exists with the same fingerprint is skipped, so a
killed or rerun run resumes where it stopped; the manifest is written last, so a half-written stage is simply
redone. A store may also reuse a matching stage from sibling run folders (`reuse_from`) instead of computing it
again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.console import stage_progress
from raypipe.files import write_atomic
from raypipe.fingerprint import fingerprint

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
ROWS_FILE = "data.parquet"
KEPT_FINGERPRINT = "stage_fingerprint"
"""In a stage's `keep` folder: the fingerprint of the stage that wrote it."""


@dataclass
class StageResult:
    """What a finished (or skipped) stage left behind."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics", {})

    def rows(self) -> list[dict[str, Any]]:
        return read_rows(self.dir)


@dataclass
class ArtifactStore:
    """Runs stages of one run folder, skipping those whose manifest matches."""

    run_dir: Path
    reuse_from: Sequence[Path] = ()
    """Other run folders whose finished stages may stand in for ours when the fingerprint matches (the arms of a
    comparison share their SFT checkpoint, samples and control this way)."""
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each stage of this run, by label (a skipped stage reports the run that made it)."""
    on_stage: Callable[[str, str, StageResult], None] | None = None
    """Called as each stage resolves, with its label, 'executed', 'skipped' or 'reused', and its result (the run's
    W&B tracker logs stage timings this way, as they happen)."""

    def stage_dir(self, round_idx: int, name: str) -> Path:
        return self.run_dir / f"round_{round_idx}" / name

    def run(self, round_idx: int, name: str, config: Any, inputs: Sequence[StageResult],
            body: Callable[[Path], dict[str, Any]], keep: str | None = None) -> StageResult:
        """Run `body(stage_dir) -> metrics` unless an identical run of this stage is already on disk.

        `keep` names a subfolder (a training stage's checkpoints) that survives the rerun of an unfinished stage
        made under the same fingerprint; the store writes that fingerprint into it as KEPT_FINGERPRINT, and removes
        it once the body has returned (its output is complete, the checkpoints are spent)."""
        out = self.stage_dir(round_idx, name)
        label = f"round_{round_idx}/{name}"
        fp = fingerprint(code_version(), name, config, [i.fingerprint for i in inputs])
        inputs_at = {_relative(i.dir, self.run_dir): i.fingerprint for i in inputs}
        existing = _read_manifest(out)
        if existing and existing.get("fingerprint") == fp and _same_inputs(existing, self.run_dir, inputs):
            log.info("skip %s (manifest matches)", label)
            return self._resolved(label, "skipped", StageResult(out, existing))
        for other in self.reuse_from:
            theirs = other / f"round_{round_idx}" / name
            manifest = _read_manifest(theirs)
            if (manifest and manifest.get("fingerprint") == fp and theirs.resolve() != out.resolve()
                    and _same_inputs(manifest, other, inputs)):
                log.info("reuse %s from %s (fingerprint matches)", label, other)
                return self._resolved(label, "reused", StageResult(theirs, manifest))
        _clear(out, keep, fp)
        log.info("run %s", label)
        start = time.perf_counter()
        with stage_progress(label):
            metrics = body(out)
        if keep:
            shutil.rmtree(out / keep, ignore_errors=True)
        manifest = {
            "stage": name, "round": round_idx, "fingerprint": fp, "code": code_version(),
            "inputs": inputs_at,
            "seconds": round(time.perf_counter() - start, 3), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "metrics": metrics,
        }
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, default=str))
        return self._resolved(label, "executed", StageResult(out, manifest))

    def _resolved(self, label: str, status: str, stage: StageResult) -> StageResult:
        {"executed": self.executed, "skipped": self.skipped, "reused": self.reused}[status].append(label)
        self.seconds[label] = stage.manifest["seconds"]
        if self.on_stage is not None:
            self.on_stage(label, status, stage)
        return stage


@functools.cache
def code_version() -> str:
    """raypipe's version + the digest of its source, once per process: part of every fingerprint, so a stage made
    by other code is redone without a version number to remember to bump, while an identical rerun (a resume,
    `reuse_from`) computes the same digest and skips."""
    try:
        version = importlib.metadata.version("raypipe")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree (a Ray job's working dir)
        version = "unreleased"
    return f"{version}+{source_digest(Path(__file__).resolve().parent)}"


def source_digest(package: Path) -> str:
    """12 hex digits of sha256 over every .py and .yaml file under `package` (names and contents, by relative
    path): what a stage's output can depend on, prompts and task catalogues included; not timestamps or caches."""
    digest = hashlib.sha256()
    files = {p.relative_to(package).as_posix(): p for pattern in ("*.py", "*.yaml") for p in package.rglob(pattern)}
    for name in sorted(files):
        digest.update(f"{name}\0{len(data := files[name].read_bytes())}\0".encode() + data)
    return digest.hexdigest()[:12]


def _clear(out: Path, keep: str | None, fp: str) -> None:
    """Empty an unfinished stage's folder, except `keep` when this fingerprint wrote it: a killed training stage
    resumes from its own checkpoints, never from those of another config or other inputs."""
    kept = out / keep if keep else None
    stamp = kept / KEPT_FINGERPRINT if kept else None
    resumable = stamp is not None and stamp.is_file() and stamp.read_text() == fp
    for path in list(out.iterdir()) if out.exists() else []:
        if path == kept and resumable:
            log.info("keep %s/%s/%s (same fingerprint)", out.parent.name, out.name, keep)
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if stamp is not None:
        stamp.parent.mkdir(exist_ok=True)
        stamp.write_text(fp)


def write_rows(stage_dir: Path, rows: Sequence[dict[str, Any]], name: str = ROWS_FILE) -> int:
    """Write rows as one Parquet file (empty stages still get a file, so readers need no special case)."""
    table = pa.Table.from_pylist(list(rows)) if rows else pa.table({})
    pq.write_table(table, stage_dir / name)
    return len(rows)


def read_rows(stage_dir: Path, name: str = ROWS_FILE) -> list[dict[str, Any]]:
    return pq.read_table(stage_dir / name).to_pylist()


def _same_inputs(manifest: dict[str, Any], run_dir: Path, inputs: Sequence[StageResult]) -> bool:
    """Whether a finished stage was built from exactly these input folders. Equal fingerprints are not enough: a
    stage built on a sibling run's SFT is stale once this run trains its own (training is not bit-reproducible)."""
    recorded = {_resolve(key, run_dir): fp for key, fp in manifest.get("inputs", {}).items()}
    return recorded == {i.dir.resolve(): i.fingerprint for i in inputs}


def _resolve(key: str, run_dir: Path) -> Path:
    """Inverse of `_relative`: a recorded input folder, relative to the run folder or to its parent."""
    own = run_dir / key
    return (own if own.exists() or not (run_dir.parent / key).exists() else run_dir.parent / key).resolve()


def _relative(path: Path, root: Path) -> str:
    """`path` relative to `root`, or relative to root's parent for a stage reused from a sibling run folder."""
    for base in (root, root.parent):
        if path.resolve().is_relative_to(base.resolve()):
            return str(path.resolve().relative_to(base.resolve()))
    return str(path)


def _read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None
