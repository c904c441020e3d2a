"""A stage's fingerprint: a short stable hash of the config sections it reads and its inputs' fingerprints, with
a user's model directory and the task's data files counted by their content, not their path."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from raypipe.config import ModelConfig
from raypipe.data_config import ModelCallConfig
from raypipe.files import data_digest, model_digest
from raypipe.task_config import DATA_PATHS, TaskConfig


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config sections and upstream fingerprints: equal inputs, equal hash. A local model
    directory named in a section enters by its content, not its path (`_identity`)."""
    blob = json.dumps(parts, sort_keys=True, default=_identity).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _identity(part: Any) -> Any:
    """What a non-JSON part contributes to a fingerprint. A config section: its fields (nested sections come back
    here), where a user's model directory (`model.path`, a `backend: local` ModelCallConfig) and the task's data
    files (DATA_PATHS) are replaced by the digest of their files, so weights or rows rewritten in place rerun the
    stages built on them and the same files moved elsewhere reuse them. A name that is no local path (a served
    model, a hub id, `hf:gsm8k:main:train`) stays as written."""
    if not dataclasses.is_dataclass(part) or isinstance(part, type):
        return str(part)
    if isinstance(part, ModelConfig) and part.path and Path(part.path).is_dir():
        part = dataclasses.replace(part, path=f"sha256:{model_digest(Path(part.path))}")
    elif isinstance(part, ModelCallConfig) and part.backend == "local" and Path(part.model).is_dir():
        part = dataclasses.replace(part, model=f"sha256:{model_digest(Path(part.model))}")
    elif isinstance(part, TaskConfig):
        part = dataclasses.replace(part, **{name: f"sha256:{data_digest(Path(getattr(part, name)))}"
                                            for name in DATA_PATHS if getattr(part, name)
                                            and Path(getattr(part, name)).exists()})
    return {f.name: getattr(part, f.name) for f in dataclasses.fields(part)}
