"""Any OpenAI-compatible endpoint behind the text interface: bounded concurrency, retries, an on-disk cache.

Retries (408/409/429/5xx and connection errors, exponential backoff with jitter) and timeouts are the `openai`
client's own; this module adds what a data stage needs on top: many requests in flight at once but no more than
`max_concurrency`, a response cache keyed by the whole request and the served weights (a rerun of a stage does
not pay twice, a retrained model is asked again), usage totals for the manifest, errors that say what to fix instead
of a stack trace, and a key sent only where it is meant to go (named explicitly, encrypted off this machine).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
from tqdm import tqdm

from raypipe.data_config import ModelCallConfig
from raypipe.engines.base import SamplingSpec
from raypipe.engines.checks import check_key_transport, key_from_env
from raypipe.engines.text import EngineError, Message, TextGenerator, Usage

log = logging.getLogger(__name__)
WEIGHTS_FIELD = "raypipe_weights_sha256"
"""The field of a model's `/v1/models` metadata in which `raypipe serve` names the weights it serves."""


class ResponseCache:
    """One JSON file per request under `root`, named by the request's hash; written atomically."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        path = self.root / key[:2] / f"{key}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:  # a file from a killed writer of an older version: ask again
            return None

    def put(self, key: str, value: dict[str, Any]) -> None:
        path = self.root / key[:2] / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)


class OpenAIEngine(TextGenerator):
    """Chat and completion calls to `cfg.base_url`; the key, if any, comes from the environment variable
    `cfg.api_key_env`."""

    def __init__(self, cfg: ModelCallConfig, cache_root: Path | None = None) -> None:
        self.cfg = cfg
        self.usage = Usage()
        self._lock = threading.Lock()
        key = key_from_env(cfg.api_key_env, "api_key_env") if cfg.api_key_env else None
        if key:
            check_key_transport(cfg.base_url, cfg.key_over_http, "key_over_http")
        # the client wants a key (else it takes $OPENAI_API_KEY): with none, each call drops its Authorization header
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key or "unused", timeout=cfg.timeout_s,
                                    max_retries=cfg.max_retries)
        self._auth: dict[str, Any] = {} if key else {"extra_headers": {"Authorization": openai.Omit()}}
        self.cache = ResponseCache(cache_root) if cache_root is not None else None
        self._weights: str | None = None
        self._weights_lock = threading.Lock()

    def chat(self, conversations: Sequence[list[Message]], spec: SamplingSpec) -> list[list[str]]:
        return self._run([{"kind": "chat", "messages": c, **self._params(spec)} for c in conversations])

    def complete(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[str]]:
        return self._run([{"kind": "completion", "prompt": p, **self._params(spec)} for p in prompts])

    def close(self) -> None:
        self.client.close()

    def _params(self, spec: SamplingSpec) -> dict[str, Any]:
        params: dict[str, Any] = {"model": self.cfg.model, "n": spec.n, "temperature": spec.temperature,
                                  "top_p": spec.top_p, "max_tokens": spec.max_tokens}
        if spec.stop:
            params["stop"] = list(spec.stop)
        if spec.seed is not None:
            params["seed"] = spec.seed
        return params

    def _run(self, requests: list[dict[str, Any]]) -> list[list[str]]:
        if not requests:
            return []
        workers = max(1, min(self.cfg.max_concurrency, len(requests)))
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(self._one, r) for r in requests]
            try:
                return [f.result() for f in tqdm(futures, desc=f"{self.cfg.model} @ {self.cfg.base_url}",
                                                 disable=len(futures) < 20, leave=False)]
            except EngineError:  # a bad key or a dead server dooms the rest: do not send it
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _one(self, request: dict[str, Any]) -> list[str]:
        try:
            key = self._cache_key(request) if self.cache else ""
            cached = self.cache.get(key) if self.cache else None
            if cached is not None:
                with self._lock:
                    self.usage.cache_hits += 1
                return cached["texts"]
            body = {**{k: v for k, v in request.items() if k != "kind"}, **self._auth}
            if request["kind"] == "chat":
                response = self.client.chat.completions.create(**body)
                texts = [c.message.content or "" for c in sorted(response.choices, key=lambda c: c.index)]
            else:
                response = self.client.completions.create(**body)
                texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            where = f"the environment variable {self.cfg.api_key_env}" if self.cfg.api_key_env else \
                "an environment variable and name it in api_key_env"
            raise EngineError(f"{self.cfg.base_url}: authentication failed (HTTP {err.status_code}); put the key "
                              f"in {where}") from None
        except openai.NotFoundError as err:
            raise EngineError(f"{self.cfg.base_url}: model {self.cfg.model!r} or route not found (HTTP 404: "
                              f"{_message(err)})") from None
        except openai.BadRequestError as err:  # this request's own problem: the row fails, the batch goes on
            log.warning("%s: request rejected (HTTP 400: %s)", self.cfg.base_url, _message(err))
            with self._lock:
                self.usage.rejected += 1
            return []
        except openai.APIConnectionError as err:
            raise EngineError(f"{self.cfg.base_url}: no answer after {self.cfg.max_retries} retries ({err})") from None
        except openai.APIStatusError as err:
            retried = err.status_code in (408, 409, 429) or err.status_code >= 500
            raise EngineError(f"{self.cfg.base_url}: HTTP {err.status_code}"
                              f"{f' after {self.cfg.max_retries} retries' if retried else ''}: {_message(err)}") from None
        with self._lock:
            self.usage.requests += 1
            if response.usage is not None:
                self.usage.prompt_tokens += response.usage.prompt_tokens
                self.usage.completion_tokens += response.usage.completion_tokens
        if self.cache:
            self.cache.put(key, {"texts": texts})
        return texts

    def _cache_key(self, request: dict[str, Any]) -> str:
        """The request and where it goes; plus the served weights when the server names them, so a model retrained
        behind the same URL and name is asked again instead of answered from the old model's cache."""
        weights = self._served_weights()
        return ResponseCache.key({"base_url": self.cfg.base_url, **request,
                                  **({"served_weights": weights} if weights else {})})

    def _served_weights(self) -> str:
        """The hash of the weights served as `cfg.model`, asked once from `/v1/models` ("" when the server names
        none: only `raypipe serve` does; vLLM's `created` is no help, it is the time of the listing)."""
        with self._weights_lock:
            if self._weights is None:
                try:
                    cards = self.client.models.list(**self._auth).data
                except openai.NotFoundError:  # a server without a model list
                    cards = []
                metadata = next(((c.model_extra or {}).get("metadata") for c in cards if c.id == self.cfg.model),
                                None)
                self._weights = str((metadata or {}).get(WEIGHTS_FIELD) or "")
            return self._weights


def _message(err: openai.APIStatusError) -> str:
    body = err.body if isinstance(err.body, dict) else {}
    return str(body.get("message") or body.get("error", {}).get("message") or err.message)[:300]
