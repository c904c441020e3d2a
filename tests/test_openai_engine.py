"""The OpenAI-compatible engine against a real server on loopback: raypipe's Serve app with the e2e run's model
(vLLM behind Ray Serve LLM), and the local engine behind the same text interface."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.config import EngineConfig
from raypipe.data.steps import format_prompt
from raypipe.data_config import ModelCallConfig
from raypipe.engines import EngineError, SamplingSpec, make_text_generator
from raypipe.engines.openai_api import OpenAIEngine

KEY_ENV = "RAYPIPE_TEST_API_KEY"
GREEDY = SamplingSpec(max_tokens=48)


@pytest.fixture
def endpoint(served: dict, monkeypatch: pytest.MonkeyPatch) -> ModelCallConfig:
    monkeypatch.setenv(KEY_ENV, served["token"])
    return ModelCallConfig(base_url=served["url"] + "/v1", model="raypipe", api_key_env=KEY_ENV, max_retries=1)


def first_evaluated(served: dict) -> dict:
    return pq.read_table(served["run_dir"] / "round_1" / "evaluate" / "data.parquet").to_pylist()[0]


def test_completion_and_chat_answer_like_the_pipeline(endpoint: ModelCallConfig, served: dict) -> None:
    row = first_evaluated(served)
    engine = OpenAIEngine(endpoint)
    assert engine.complete([format_prompt(row["question"])], GREEDY) == [[row["completion"]]]
    # the tiny model's chat template renders a user turn as the training prompt
    chat = engine.chat([[{"role": "user", "content": row["question"]}]] * 3, GREEDY)
    assert chat == [[row["completion"]]] * 3
    two = engine.complete([format_prompt(row["question"])], SamplingSpec(n=2, temperature=1.0, max_tokens=16))
    assert len(two[0]) == 2
    assert engine.usage.requests == 5 and engine.usage.prompt_tokens > 0 and engine.usage.completion_tokens > 0


def test_a_rerun_is_answered_from_the_cache(endpoint: ModelCallConfig, served: dict, tmp_path: Path) -> None:
    prompts = [format_prompt(r) for r in ("Start with 3. Add 4. What is the result?",
                                          "Start with 9. Add 1. What is the result?")]
    first = make_text_generator(endpoint, EngineConfig(), tmp_path)
    answers = first.complete(prompts, GREEDY)
    assert (first.usage.requests, first.usage.cache_hits) == (2, 0)
    assert len(list((tmp_path / endpoint.cache_dir).rglob("*.json"))) == 2
    rerun = make_text_generator(endpoint, EngineConfig(), tmp_path)  # a new process would see the same files
    assert rerun.complete(prompts, GREEDY) == answers
    assert (rerun.usage.requests, rerun.usage.cache_hits) == (0, 2)
    other = rerun.complete(prompts[:1], SamplingSpec(max_tokens=8))  # another request is another key
    assert rerun.usage.requests == 1 and len(other[0][0]) <= len(answers[0][0])


def test_a_wrong_key_is_a_clear_error(endpoint: ModelCallConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "wrong")
    with pytest.raises(EngineError, match=f"authentication failed.*{KEY_ENV}"):
        OpenAIEngine(endpoint).complete(["Start with 1."], GREEDY)


def test_an_unknown_model_is_a_clear_error(endpoint: ModelCallConfig) -> None:
    endpoint.model = "gpt-nothing"
    with pytest.raises(EngineError, match="'gpt-nothing'.*404"):
        OpenAIEngine(endpoint).chat([[{"role": "user", "content": "hi"}]], GREEDY)


def test_a_rejected_request_fails_alone(endpoint: ModelCallConfig) -> None:
    """A prompt over the model's context is answered 400: that request gets no completion, the others do."""
    engine = OpenAIEngine(endpoint)
    answers = engine.complete(["Start with 2.", "Add 1. " * 400, "Start with 3."], SamplingSpec(max_tokens=8))
    assert [len(a) for a in answers] == [1, 0, 1]
    assert (engine.usage.requests, engine.usage.rejected) == (2, 1)


def test_retries_carry_a_burst_through_an_overloaded_server(endpoint: ModelCallConfig) -> None:
    """24 requests at once against a server that holds 2 + 2 (test_serving shows it answers 503 to the rest):
    with retries and backoff every one succeeds; without, the burst fails with a clear error."""
    burst = ["Start with 5."] * 24
    spec = SamplingSpec(max_tokens=64, temperature=1.0)
    endpoint.max_concurrency = 24
    endpoint.max_retries = 0
    with pytest.raises(EngineError, match="HTTP 503 after 0 retries"):
        OpenAIEngine(endpoint).complete(burst, spec)
    endpoint.max_retries = 10
    engine = OpenAIEngine(endpoint)
    assert all(len(texts) == 1 for texts in engine.complete(burst, spec))
    assert engine.usage.requests == 24


def test_local_backend_serves_the_same_interface(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = ModelCallConfig(backend="local", model=str(tiny_model_dir))
    engine = make_text_generator(cfg, EngineConfig(backend="hf"), tmp_path)
    chat = engine.chat([[{"role": "user", "content": "Start with 2. Add 3. What is the result?"}]],
                       SamplingSpec(n=2, temperature=1.0, max_tokens=8))
    completion = engine.complete(["Start with 2."], SamplingSpec(max_tokens=8))
    assert len(chat[0]) == 2 and len(completion) == 1
    assert engine.usage.requests == 2 and engine.usage.completion_tokens > 0
