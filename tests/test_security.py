"""Security (issue 6): weights load from safetensors only, a model folder's own code never runs unless the config
says so, keys come from the environment only, and the serving token guards every route of the app."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from raypipe.cli import main
from raypipe.config import ConfigError, EngineConfig, RunConfig, load_config
from raypipe.data_config import ModelCallConfig
from raypipe.engines import EngineError, make_generator
from serving.settings import TOKEN_ENV, ServeConfig, load_serve_config, resolve_model

ROOT = Path(__file__).resolve().parents[1]
SECRET_NAME = re.compile(r"(^|_)(api_?key|key|token|secret|password)$")


@pytest.fixture(scope="module")
def pickled_model(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its weights as a pickled pytorch_model.bin and no safetensors (transformers 5 always
    saves safetensors, so the .bin is written with torch.save as older checkpoints were)."""
    folder = tmp_path_factory.mktemp("pickled")
    shutil.copytree(tiny_model_dir, folder, dirs_exist_ok=True)
    weights = folder / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    return folder


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_engines_refuse_pickled_weights_with_a_clear_error(pickled_model: Path, backend: str) -> None:
    with pytest.raises(EngineError, match=r"no \*\.safetensors weights \(it holds pytorch_model\.bin\)\. raypipe "
                                          r"loads safetensors only"):
        make_generator(EngineConfig(backend=backend), str(pickled_model))


def test_transformers_is_told_safetensors_only_too(pickled_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past raypipe's own check, `use_safetensors=True` still stops transformers from unpickling the .bin."""
    monkeypatch.setattr("raypipe.engines.hf.require_safetensors", lambda _: None)
    with pytest.raises(OSError, match="model.safetensors"):
        make_generator(EngineConfig(backend="hf"), str(pickled_model))


def test_eval_and_serve_refuse_pickled_weights(pickled_model: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(pickled_model), "--data", str(tmp_path / "x.jsonl"), "--kind", "gsm8k"]) == 2
    assert "loads safetensors only" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="model: .*no \\*.safetensors weights"):
        resolve_model(str(pickled_model))


def model_loading_calls() -> list[tuple[str, ast.Call]]:
    """(file:line, call) for every `X.from_pretrained(...)` and `LLM(...)` in raypipe/ and serving/."""
    calls = []
    for path in [*sorted((ROOT / "raypipe").rglob("*.py")), *sorted((ROOT / "serving").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and (
                    (isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained")
                    or (isinstance(node.func, ast.Name) and node.func.id == "LLM")):
                calls.append((f"{path.relative_to(ROOT)}:{node.lineno}", node))
    return calls


def test_every_model_load_in_the_code_is_safetensors_only_and_never_trusts_code_on_its_own() -> None:
    """Models (AutoModel*.from_pretrained, vllm.LLM) say `use_safetensors=True` / `load_format="safetensors"` and
    pass `trust_remote_code` explicitly; nothing (tokenizers included) sets `trust_remote_code=True` literally."""
    calls = model_loading_calls()
    models = [(where, c) for where, c in calls if isinstance(c.func, ast.Name)
              or (isinstance(c.func.value, ast.Name) and c.func.value.id.startswith("AutoModel"))]
    assert len(models) >= 4, models  # hf engine, vllm engine, training, reference scoring
    for where, call in models:
        kwargs = {k.arg: k.value for k in call.keywords}
        expected = ("load_format", "safetensors") if isinstance(call.func, ast.Name) else ("use_safetensors", True)
        assert isinstance(kwargs.get(expected[0]), ast.Constant) and kwargs[expected[0]].value == expected[1], where
        assert "trust_remote_code" in kwargs, where
    for where, call in calls:
        value = next((k.value for k in call.keywords if k.arg == "trust_remote_code"), None)
        assert not (isinstance(value, ast.Constant) and value.value is True), where


def test_serve_passes_safetensors_and_trust_remote_code_to_vllm(tiny_model_dir: Path) -> None:
    from serving.app import llm_config

    engine = llm_config(ServeConfig(), tiny_model_dir, gpu=False).engine_kwargs
    assert (engine["load_format"], engine["trust_remote_code"]) == ("safetensors", False)
    assert llm_config(ServeConfig(trust_remote_code=True), tiny_model_dir, gpu=False).engine_kwargs[
        "trust_remote_code"] is True


def test_a_model_folders_own_code_does_not_run_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A folder whose config.json points at Python shipped beside it (auto_map): loading it must fail, and the
    file must never be imported (it would leave a marker)."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code_ran"
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace('"model_type": "llama"', '"model_type": "custom_x", '
                                        '"auto_map": {"AutoConfig": "custom_model.Config", '
                                        '"AutoModelForCausalLM": "custom_model.Model"}'))
    save_file({"w": torch.zeros(1)}, folder / "model.safetensors")
    assert EngineConfig().trust_remote_code is False and ServeConfig().trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        make_generator(EngineConfig(backend="hf"), str(folder))
    assert not marker.exists()


def config_fields(section: object, prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        names += config_fields(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return names


def test_no_config_field_can_hold_a_key() -> None:
    """Secrets have `*_env` fields naming their environment variable; none holds the secret itself."""
    fields = config_fields(RunConfig()) + config_fields(ServeConfig()) + config_fields(ModelCallConfig())
    assert "realign.model.api_key_env" in fields and "realign.web_search_key_env" in fields
    assert [f for f in fields if SECRET_NAME.search(f.rsplit(".", 1)[-1])] == []


@pytest.mark.parametrize("override", ["realign.model.api_key=sk-live-123", "lema.corrector_model.api_key=sk-live-123",
                                      "wandb.api_key=sk-live-123", "realign.serper_api_key=sk-live-123"])
def test_a_key_in_a_config_is_a_config_error_pointing_at_the_environment(override: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="read from environment variables only") as err:
        load_config(None, [override])
    assert "sk-live-123" not in str(err.value)
    path = tmp_path / "run.yaml"
    key, value = override.split("=")
    section, *middle, name = key.split(".")
    nested = f"{name}: {value}"
    for part in reversed(middle):
        nested = f"{part}:\n  " + nested.replace("\n", "\n  ")
    path.write_text(f"{section}:\n  " + nested.replace("\n", "\n  ") + "\n")
    message = re.escape(f"{path}: unknown config key '{key}' (") + ".*environment variables only"
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_a_serving_token_in_its_config_is_refused() -> None:
    for args, overrides in (({"token": "abc"}, None), (None, ["auth_token=abc"])):
        with pytest.raises(ConfigError, match=f"read from the environment variable {TOKEN_ENV} only"):
            load_serve_config(args, overrides)


def test_model_call_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from raypipe.engines.openai_api import OpenAIEngine

    monkeypatch.setenv("RAYPIPE_TEST_KEY", "from-the-environment")
    engine = OpenAIEngine(ModelCallConfig(api_key_env="RAYPIPE_TEST_KEY"))
    assert engine.client.api_key == "from-the-environment"
    engine.close()
    with pytest.raises(ConfigError, match="api_key_env must be the NAME of an environment variable"):
        OpenAIEngine(ModelCallConfig(api_key_env="sk-proj-live-123"))
    cfg = load_config(None, ["method=realign", "realign.web_search_key_env=sk live 123", f"output_dir={tmp_path}"])
    assert main(["run", str(ROOT / "conf" / "realign_gsm8k.yaml"), "realign.web_search_key_env=sk live 123",
                 f"output_dir={tmp_path}"]) == 2
    from raypipe.realign.stage import retriever

    with pytest.raises(ConfigError, match="realign.web_search_key_env must be the NAME"):
        retriever(cfg)


# --- the serving token on every route ----------------------------------------------------------------------


@pytest.fixture
def guarded_app(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """The ingress's real FastAPI app (routes, Ray Serve LLM's middleware, raypipe's guard) without Ray Serve:
    Serve would hand each route the replica's ingress object through `serve.get_replica_context()`, so the test
    hands it a RaypipeIngress with no model deployments (the OpenAI routes then answer 404 / 400 on their own)."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serving.app import RaypipeIngress, ingress_deployment

    cfg = ServeConfig()
    _, app = ingress_deployment(cfg)
    ingress = RaypipeIngress({}, {}, settings=asdict(cfg), answer_kind="gsm8k", page="<html>demo</html>")
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=ingress))
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    return SimpleNamespace(app=app, client=TestClient(app, raise_server_exceptions=False))


def every_route(app: object) -> list[tuple[str, str]]:
    """(method, path with its parameters filled in) for every route the app registers, FastAPI's own included."""
    out = []
    for route in app.routes:  # type: ignore[attr-defined]
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            out.append((method, re.sub(r"\{[^}]+\}", "x", route.path)))
    return out


def test_every_route_needs_the_token(guarded_app: SimpleNamespace) -> None:
    routes = every_route(guarded_app.app)
    paths = {path for _, path in routes}
    assert {"/", "/grade", "/v1/models", "/v1/models/x", "/v1/completions", "/v1/chat/completions",
            "/openapi.json", "/docs"} <= paths, paths
    client = guarded_app.client
    for method, path in [*routes, ("GET", "/no/such/route")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers)
        response = client.request(method, path, headers={"Authorization": "Bearer s3cret"}, json={})
        assert response.status_code != 401, (method, path, response.text)


def test_with_the_token_the_routes_answer(guarded_app: SimpleNamespace) -> None:
    client, auth = guarded_app.client, {"Authorization": "Bearer s3cret"}
    grade = client.post("/grade", json={"completion": "so #### 42", "expected": "42"}, headers=auth)
    assert grade.json() == {"correct": True, "predicted": "42", "reason": "correct", "kind": "gsm8k"}
    assert client.get("/v1/models", headers=auth).json()["data"] == []
    assert client.post("/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 10**6},
                       headers=auth).status_code == 400  # raypipe's max_tokens limit, checked before the model
    assert client.get("/?token=s3cret").text == "<html>demo</html>"
    assert client.get("/v1/models?token=s3cret").status_code == 401  # the address token is for the page only
