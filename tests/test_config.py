"""Config loading: YAML + dotted overrides onto documented dataclasses; mistakes name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypipe.cli import main
from raypipe.config import ConfigError, RunConfig, describe, load_config

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_every_yaml_under_conf_loads() -> None:
    """Run recipes as run configs; comparisons (a `arms:` key) as comparison configs, every arm checked too."""
    from raypipe.compare import CompareConfig, load_compare

    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= {"quickstart", "sft", "rft", "dpo", "ipo", "stepdpo", "aft", "lema", "compare",
                                       "compare_lema", "lema_quickstart", "realign_gsm8k"}
    for path in files:
        if "arms:" in path.read_text():
            assert isinstance(load_compare(path), CompareConfig)
        else:
            assert isinstance(load_config(path), RunConfig)


def test_overrides_win_and_types_are_checked() -> None:
    cfg = load_config(CONF / "quickstart.yaml", ["train.zero_stage=3", "sampling.temperature=0.5"])
    assert cfg.train.zero_stage == 3 and cfg.sampling.temperature == 0.5
    with pytest.raises(ConfigError, match="train.zero_stage"):
        load_config(None, ["train.zero_stage=seven"])


def test_unknown_keys_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sampling.temprature"):
        load_config(None, ["sampling.temprature=0.5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("branch:\n  rollout: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'branch.rollout'"):
        load_config(bad)


def test_invalid_choices_are_rejected() -> None:
    with pytest.raises(ConfigError, match="branch.localiser"):
        load_config(None, ["branch.localiser=gpt4"])
    with pytest.raises(ConfigError, match=">= 32"):
        load_config(None, ["model.num_heads=8"])


@pytest.mark.parametrize("overrides, message", [
    (["engine.tensor_parallel_size=2"], "engine.num_gpus=2"),
    (["engine.tensor_parallel_size=2", "engine.num_gpus=2", "engine.backend=hf"], "backend=vllm"),
    (["engine.tensor_parallel_size=0"], ">= 1"),
    (["engine.colocate=true"], "engine.colocate needs GPUs"),
    (["engine.colocate=true", "engine.num_gpus=0.5"], "train.use_gpu=true"),
])
def test_engine_parallelism_and_colocation_need_their_gpus(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    load_config(None, ["engine.tensor_parallel_size=2", "engine.num_gpus=2", "engine.colocate=true",
                       "train.use_gpu=true"])  # the consistent version of each passes


def test_every_field_is_documented(capsys: pytest.CaptureFixture[str]) -> None:
    lines = describe()
    assert any(line.startswith("branch.rollouts: 8") for line in lines)
    undocumented = [line for line in lines if line.endswith("# ")]
    assert not undocumented, undocumented
    assert main(["config", "show"]) == 0
    assert "stepdpo.beta" in capsys.readouterr().out


def test_cli_reports_config_errors_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(CONF / "quickstart.yaml"), "nope.key=1"]) == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err
