"""What the serving app is told: its config, which model a run folder serves, the Serve YAML (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from raypipe.config import ConfigError
from serving.app import demo_page
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
                                           ({"answer_kind": "chess"}, "answer_kind='chess'")])
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
