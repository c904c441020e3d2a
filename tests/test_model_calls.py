"""The OpenAI-compatible engine's rules on keys and on its response cache, against a small fake server on loopback
that records what it is sent and names the weights it serves the way `raypipe serve` does (no model, no Ray)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from raypipe.config import ConfigError
from raypipe.data_config import ModelCallConfig
from raypipe.engines import SamplingSpec
from raypipe.engines.openai_api import WEIGHTS_FIELD, OpenAIEngine
from serving.settings import weights_sha256

SPEC = SamplingSpec(max_tokens=8)


class FakeServer(ThreadingHTTPServer):
    """Answers /v1/models (naming `weights`, when set) and /v1/completions (with the weights in the text)."""

    weights: str | None = "aaa"
    seen: list[dict[str, str | None]]


class Handler(BaseHTTPRequestHandler):
    server: FakeServer

    def do_GET(self) -> None:
        metadata = {WEIGHTS_FIELD: self.server.weights} if self.server.weights else {}
        self.answer({"object": "list", "data": [{"id": "other", "object": "model", "owned_by": "x"},
                                                {"id": "raypipe", "object": "model", "owned_by": "x",
                                                 "metadata": metadata}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.answer({"id": "c", "object": "text_completion", "created": 0, "model": "raypipe",
                     "choices": [{"index": 0, "text": f"from {self.server.weights}", "finish_reason": "stop"}]})

    def answer(self, content: dict[str, Any]) -> None:
        self.server.seen.append({"authorization": self.headers.get("Authorization"), "path": self.path})
        body = json.dumps(content).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer(("127.0.0.1", 0), Handler)
    fake.seen = []
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    yield fake
    fake.shutdown()
    fake.server_close()


def endpoint(server: FakeServer, **fields: Any) -> ModelCallConfig:
    return ModelCallConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", max_retries=0, **fields)


def authorization(server: FakeServer) -> set[str | None]:
    return {h["authorization"] for h in server.seen}


def test_a_key_goes_only_when_its_variable_is_named(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-meant-for-openai")
    monkeypatch.setenv("RAYPIPE_TEST_KEY", "s3cret")
    assert ModelCallConfig().api_key_env is None
    assert OpenAIEngine(endpoint(server)).complete(["hi"], SPEC) == [["from aaa"]]
    assert authorization(server) == {None}, "no key named: no Authorization header at all"
    server.seen.clear()
    OpenAIEngine(endpoint(server, api_key_env="RAYPIPE_TEST_KEY")).complete(["hi"], SPEC)
    assert authorization(server) == {"Bearer s3cret"}


@pytest.mark.parametrize("url, allowed", [
    ("http://example.com/v1", False), ("http://10.0.0.5:8000/v1", False), ("http://localhost.example.com/v1", False),
    ("https://example.com/v1", True), ("http://127.0.0.1:8000/v1", True), ("http://127.8.0.1/v1", True),
    ("http://localhost:8000/v1", True), ("http://[::1]:8000/v1", True),
])
def test_a_key_is_never_sent_unencrypted_to_another_machine(url: str, allowed: bool,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYPIPE_TEST_KEY", "s3cret")
    cfg = ModelCallConfig(base_url=url, api_key_env="RAYPIPE_TEST_KEY")
    if allowed:
        OpenAIEngine(cfg).close()
    else:
        with pytest.raises(ConfigError, match="unencrypted to another machine.*key_over_http=true") as err:
            OpenAIEngine(cfg)
        assert "s3cret" not in str(err.value)
        cfg.key_over_http = True  # a trusted network, said so explicitly
        OpenAIEngine(cfg).close()
    monkeypatch.delenv("RAYPIPE_TEST_KEY")
    OpenAIEngine(ModelCallConfig(base_url=url, api_key_env="RAYPIPE_TEST_KEY")).close()  # no key, nothing to leak


def test_the_cache_is_keyed_on_the_served_weights(server: FakeServer, tmp_path: Path) -> None:
    """A model retrained behind the same URL and name (the server names new weights) is asked again; the same
    weights are answered from the cache; a server naming no weights is keyed by the request alone."""
    def run() -> tuple[list[list[str]], int]:
        engine = OpenAIEngine(endpoint(server), tmp_path)
        return engine.complete(["hi"], SPEC), engine.usage.cache_hits

    assert run() == ([["from aaa"]], 0)
    assert run() == ([["from aaa"]], 1)
    server.weights = "bbb"
    assert run() == ([["from bbb"]], 0)
    assert run() == ([["from bbb"]], 1)
    server.weights = None
    assert run() == ([["from None"]], 0)
    assert run() == ([["from None"]], 1)
    assert sum(h["path"] == "/v1/models" for h in server.seen) == 6, "asked once per engine"


def test_the_weights_hash_follows_the_files(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"old weights")
    (model / "tokenizer.json").write_text("{}")
    before = weights_sha256(model)
    (model / "tokenizer.json").write_text('{"changed": 1}')
    assert weights_sha256(model) == before
    (model / "model.safetensors").write_bytes(b"new weights")
    assert weights_sha256(model) != before
