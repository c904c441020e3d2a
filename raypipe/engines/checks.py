"""What raypipe checks before it loads or calls a model: weights in safetensors only (a pickled `.bin` / `.pt`
checkpoint can run code while it is read), the context length every prompt plus its answer must fit in, and keys
that come from the environment, never from a config, and travel encrypted unless they stay on this machine."""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

from raypipe.config import ConfigError
from raypipe.engines.text import EngineError

PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
"""config.json keys that hold a model's longest sequence, by architecture family."""


def require_safetensors(model_dir: str | Path) -> None:
    """EngineError, naming what the folder holds instead, unless it has `*.safetensors` weights. A path that is not
    a local folder is left to the loader (which is told `use_safetensors` / `load_format` as well)."""
    folder = Path(model_dir)
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLED_SUFFIXES)
    holds = f" (it holds {', '.join(pickled[:3])})" if pickled else ""
    raise EngineError(f"{folder}: no *.safetensors weights{holds}. raypipe loads safetensors only, since pickled "
                      "weights can run code when they are read; convert a checkpoint you trust with "
                      "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder)")


def context_length(model_dir: str | Path, max_model_len: int) -> int:
    """The longest prompt + completion the model takes: the engine's `max_model_len`, capped by the model's own
    limit from its config.json (a transformers model fed past it degrades silently; vLLM refuses to start)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):  # no readable config: the loader reports that itself
        return max_model_len
    if not isinstance(config, dict):
        return max_model_len
    text = config.get("text_config")
    for section in (config, text if isinstance(text, dict) else {}):
        for key in _CONTEXT_KEYS:
            value = section.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return min(max_model_len, value)
    return max_model_len


def key_from_env(variable: str, setting: str) -> str | None:
    """The key in the environment variable named `variable` (None when unset or empty). A `variable` that cannot be
    a variable's name is most likely the key itself pasted into `setting`: a ConfigError, showing none of it."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", variable):
        raise ConfigError(f"{setting} must be the NAME of an environment variable, not a key ({len(variable)} "
                          "characters that cannot be a variable name were given): keys are read from the "
                          f"environment only, e.g. `export MY_KEY=...` and {setting}=MY_KEY")
    return os.environ.get(variable) or None


def check_key_transport(url: str, allowed: bool, setting: str) -> None:
    """A key sent over plain http to another machine can be read by anyone on the way: a ConfigError naming
    `setting` (the switch that allows it), unless the URL is https or its host is this machine (loopback)."""
    parts = urlsplit(url)
    if parts.scheme == "https" or allowed or _is_loopback(parts.hostname):
        return
    raise ConfigError(f"{url}: a key would be sent unencrypted to another machine; use https://, send no key, or "
                      f"set {setting}=true if the network between is trusted")


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback  # 127.0.0.0/8 and ::1
    except ValueError:  # a name: it may resolve anywhere
        return False
