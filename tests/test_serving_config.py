"""What the serving app is told: its config, which model a run folder serves, the Serve YAML, and the ingress's
limits and grader called through its FastAPI app (no server)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from ray import serve
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.schema import ServeDeploySchema

from raypipe.config import ConfigError
from serving.app import Grader, RaypipeIngress, demo_page, ingress_deployment
from serving.settings import RunTask, ServeConfig, load_serve_config, resolve_model, run_task

ROOT = Path(__file__).resolve().parents[1]


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").touch()  # resolve_model only checks the weights are safetensors
    return folder


def finished(stage_dir: Path, model_dir: Path) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "manifest.json").write_text(json.dumps({"metrics": {"model_dir": str(model_dir)}}))


def test_a_run_folder_serves_its_latest_policy(tmp_path: Path) -> None:
    run = tmp_path / "run"
    sft = fake_model(run / "round_0" / "sft" / "model")
    finished(run / "round_0" / "sft", sft)
    assert resolve_model(str(run)) == sft
    trained = {r: fake_model(run / f"round_{r}" / "train" / "model") for r in (1, 2, 10)}
    for r, model in trained.items():
        finished(run / f"round_{r}" / "train", model)
    (run / "round_11" / "train").mkdir(parents=True)  # a round killed before its update finished
    assert resolve_model(str(run)) == trained[10]
    assert resolve_model(str(trained[2])) == trained[2]  # a model folder is served as is


@pytest.mark.parametrize("layout, message", [("missing", "is not a folder"), ("empty", "no finished train")])
def test_a_folder_without_a_model_is_a_config_error(tmp_path: Path, layout: str, message: str) -> None:
    if layout == "empty":
        (tmp_path / "run").mkdir()
    with pytest.raises(ConfigError, match=message):
        resolve_model(str(tmp_path / "run"))


@pytest.mark.parametrize("args, message", [({"modle": "x"}, "unknown config key 'modle'"),
                                           ({"max_tokens": "many"}, "bad value for 'max_tokens'"),
                                           ({"device": "tpu"}, "device='tpu'"),
                                           ({"answer_kind": "chess"}, "answer_kind='chess'"),
                                           ({"max_n": 0}, "max_n=0 must be positive"),
                                           ({"grade_timeout_s": -1}, "grade_timeout_s=-1.0 must be positive")])
def test_bad_serve_args_name_the_key(args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_serve_config(args)


def test_serve_config_yaml_is_a_valid_serve_config_of_known_args() -> None:
    config = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == "serving.app:build_app"
    assert load_serve_config(app["args"]).model == "runs/quickstart"


def test_demo_page_settings_cannot_close_the_script() -> None:
    page = demo_page(ServeConfig(), RunTask(examples=[{"question": "</script><script>alert(1)</script>",
                                                        "answer": "1"}]))
    assert "</script><script>" not in page
    assert page.count("</script>") == 1


def test_the_demo_page_asks_with_the_runs_chat_settings(tmp_path: Path) -> None:
    """A served run's page sends the chat its task builds: the run's system prompt and instruction (the model's
    chat template then renders the prompt the run trained on), and offers its own test problems."""
    from raypipe.config import RunConfig, save_config

    cfg = RunConfig()
    cfg.task.test_problems, cfg.task.system_prompt, cfg.task.instruction = 3, "Be exact.", "Show every step."
    save_config(cfg, tmp_path / "config.yaml")
    run = run_task(str(tmp_path), 2)
    assert (run.answer_kind, run.system_prompt, run.instruction) == ("synthetic", "Be exact.", "Show every step.")
    assert len(run.examples) == 2 and run.examples[0]["question"].startswith("Start with")
    script = demo_page(ServeConfig(), run).split("const SETTINGS = ", 1)[1]
    settings = json.loads(script.split(";\n", 1)[0])
    assert (settings["system"], settings["instruction"]) == ("Be exact.", "Show every step.")
    assert run_task(str(tmp_path / "not_a_run"), 2) == RunTask(), "a bare model folder: the model's own template"


COSTLY = "The answer is \\boxed{9^{9^{9^{9}}}}."
"""An answer whose comparison computes 9^(9^(9^9)): off the main thread math-verify has no timeout, and grading
it holds the GIL for minutes (measured: still running after 25 s, the whole process stalled)."""


@pytest.fixture
def ingress(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """The ingress's FastAPI app without Ray Serve (Serve would hand each route the replica's ingress object through
    `serve.get_replica_context()`), small limits, and Ray Serve LLM's own OpenAI routes replaced by one that answers
    with the request the model would have been sent."""
    cfg = ServeConfig(max_tokens=64, max_n=2, grade_timeout_s=5.0)
    _, app = ingress_deployment(cfg)
    replica = RaypipeIngress({}, {}, settings=asdict(cfg), answer_kind="math", page="<html></html>")
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))

    async def forwarded(self: OpenAiIngress, body: Any, request: Any) -> JSONResponse:
        return JSONResponse(body.model_dump(include={"max_tokens", "max_completion_tokens", "n"}))

    monkeypatch.setattr(OpenAiIngress, "completions", forwarded)
    monkeypatch.setattr(OpenAiIngress, "chat", forwarded)
    yield SimpleNamespace(client=TestClient(app, raise_server_exceptions=False), replica=replica)
    replica.grader.pool.shutdown(cancel_futures=True)


CHAT = {"model": "raypipe", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("path, body, sent", [
    ("/v1/chat/completions", CHAT, {"max_tokens": 64}),  # no length asked: the cap, not the context's end
    ("/v1/chat/completions", {**CHAT, "max_tokens": None, "max_completion_tokens": None}, {"max_tokens": 64}),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 10}, {"max_tokens": None, "max_completion_tokens": 10}),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 64, "n": 2}, {"max_tokens": 64, "n": 2}),
    # vLLM's completion request reads an absent or null max_tokens as 16 (its chat request as the context's end)
    ("/v1/completions", {"model": "raypipe", "prompt": "x", "max_tokens": None}, {"max_tokens": 16}),
    ("/v1/completions", {"model": "raypipe", "prompt": "x"}, {"max_tokens": 16}),
])
def test_requests_are_sent_on_within_the_limits(ingress: SimpleNamespace, path: str, body: dict,
                                                 sent: dict) -> None:
    response = ingress.client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert response.json().items() >= sent.items()


@pytest.mark.parametrize("path, body, words", [
    ("/v1/chat/completions", {**CHAT, "max_tokens": 65}, "max_tokens=65 is over this server's limit of 64"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 8, "max_completion_tokens": 100},
     "max_completion_tokens=100 is over this server's limit of 64"),
    ("/v1/chat/completions", {**CHAT, "n": 3}, "n=3 is over this server's limit of 2"),
    ("/v1/completions", {"model": "raypipe", "prompt": "x", "n": 3}, "n=3 is over this server's limit of 2"),
])
def test_requests_over_the_limits_are_answered_400(ingress: SimpleNamespace, path: str, body: dict,
                                                   words: str) -> None:
    response = ingress.client.post(path, json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == words


def test_a_costly_answer_times_out_and_other_answers_are_graded_meanwhile(ingress: SimpleNamespace) -> None:
    """The costly answer is answered 422 after grade_timeout_s (its worker killed, the grader restarted), while an
    ordinary answer sent at the same time is graded before it."""
    start = time.monotonic()
    response = ingress.client.post("/grade", json={"completion": COSTLY, "expected": "1"})
    assert response.status_code == 422 and "limit of 5.0 s" in response.json()["error"]["message"]
    assert time.monotonic() - start < 20
    answer = ingress.client.post("/grade", json={"completion": "The answer is 3.", "expected": "3"})
    assert answer.json() == {"correct": True, "predicted": "3", "reason": "correct", "kind": "math"}

    async def both() -> None:
        grader: Grader = ingress.replica.grader
        costly = asyncio.ensure_future(grader(COSTLY, "1"))
        ordinary = await grader("so \\boxed{\\frac{1}{2}}", "0.5")
        assert ordinary.correct and not costly.done(), "the ordinary answer waited for the costly one"
        with pytest.raises(TimeoutError):
            await costly

    asyncio.run(both())
