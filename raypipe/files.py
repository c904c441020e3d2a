"""Files the pipeline's bookkeeping depends on: writes that never leave half a file, and the identity by content of
a model directory or a data file.

A leaf module (no raypipe imports) so that both the config's `fingerprint` and the artefact store can use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
MODEL_FILES = ("*.json", "*.safetensors", "*.bin", "*.model", "*.tiktoken", "*.py", "merges.txt", "vocab.txt")
"""What makes a Hugging Face model directory what it is: config, tokenizer files, weights and any remote code (top
level only, where `from_pretrained` reads them). A README or a subfolder of originals does not count."""


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`, so a reader (or a run
    killed midway) sees the old file or the new one, never a partial one. The temporary name is unique, so two
    processes writing the same file do not clobber each other's half-written copy; it is opened like any file
    (permissions from the umask, as `write_text` gave), not 0600 as `mkstemp` would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with tmp.open("x") as out:
            out.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def hash_cache_path() -> Path:
    """Where file digests are cached: per user, since one model directory serves many runs and run folders
    (`$XDG_CACHE_HOME/raypipe/model_hashes.json`, default `~/.cache/raypipe/model_hashes.json`)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "raypipe" / "model_hashes.json"


def model_digest(model_dir: Path, patterns: tuple[str, ...] = MODEL_FILES) -> str:
    """sha256 of a model directory's files matching `patterns` (names and contents, not its path): rewritten
    weights are a new model, the same weights copied elsewhere are the same one."""
    files = sorted({p for pattern in patterns for p in model_dir.glob(pattern) if p.is_file()})
    return _digest([(f.name, f) for f in files])


def data_digest(path: Path) -> str:
    """sha256 of a data file, or of every file under a data folder (Parquet parts, `save_to_disk` output) by
    relative name and content: a dataset edited in place is new data, the same files copied elsewhere are not."""
    if path.is_file():
        return _digest([("", path)])  # its content only: a renamed copy is the same data
    return _digest([(f.relative_to(path).as_posix(), f) for f in sorted(path.rglob("*")) if f.is_file()])


def _digest(files: list[tuple[str, Path]]) -> str:
    """sha256 over (name, file digest) pairs. Hashing multi-GB weights takes minutes, so each file's digest is
    cached by (path, size, mtime_ns): an unchanged file is not read again, a rewritten one is."""
    cache_path = hash_cache_path()
    try:
        cache: dict[str, Any] = json.loads(cache_path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: start over (it is only a cache)
        cache = {}
    whole, changed = hashlib.sha256(), False
    for name, file in files:
        key, stat = str(file.resolve()), file.stat()
        entry = cache.get(key)
        if not entry or (entry["size"], entry["mtime_ns"]) != (stat.st_size, stat.st_mtime_ns):
            log.info("sha256 of %s (%.2f GB; cached in %s)", file, stat.st_size / 1e9, cache_path)
            entry = cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(file)}
            changed = True
        whole.update(f"{name}\0{entry['sha256']}\n".encode())
    if changed:
        write_atomic(cache_path, json.dumps(cache, indent=1, sort_keys=True))
    return whole.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
