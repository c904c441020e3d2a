"""The GPU memory plan (raypipe/plan.py): figures worked by hand for Qwen2.5-7B, the 7B recipe fits its
8 x 80 GiB GPUs, and a recipe that cannot fit is refused by `raypipe plan` and `raypipe run` with what to
change. No Ray, no model built, no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypipe import plan
from raypipe.cli import main
from raypipe.config import ConfigError, load_config
from raypipe.plan import (activation_bytes, kv_bytes_per_token, logit_bytes, model_shape, model_state_bytes,
                          parameter_count, plan_run, shape_from_config_json)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "conf/gpu_stepdpo_7b.yaml"
QWEN_7B = shape_from_config_json(json.loads((ROOT / "conf/models/qwen2.5-7b-instruct.json").read_text()), "")

# Qwen2.5-7B: h 3584, f 18944, L 28, 28 heads and 4 KV heads of d = 3584/28 = 128, V 152064, untied, qkv bias.
#   a layer: q 3584*3584 = 12,845,056 + k, v 2*3584*512 = 3,670,016 + their bias 3584 + 2*512 = 4,608
#            + o 3584*3584 = 12,845,056 + MLP 3*3584*18944 = 203,685,888 + two norms 2*3584 = 7,168
#            = 233,057,792;  x 28 = 6,525,618,176
#   + embeddings and lm_head 2*152064*3584 = 1,089,994,752 + final norm 3,584
P = 7_615_616_512


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config paths (model.config_json) are relative to the working directory, the repository root."""
    monkeypatch.chdir(ROOT)


def test_qwen_7b_parameter_count() -> None:
    assert parameter_count(QWEN_7B) == P
    assert abs(P / 7.615e9 - 1) < 0.005  # the published 7.62B


def test_model_states_by_zero_stage() -> None:
    # ZeRO-3, bf16, 8 GPUs: 16 P / 8 = 121,849,864,192 / 8
    assert sum(model_state_bytes(P, 3, 8, bf16=True, offload=False)) == 15_231_233_024
    # ZeRO-2: weights 2P = 15,231,233,024 + gradients 2P/8 = 1,903,904,128 + Adam 12P/8 = 11,423,424,768
    assert model_state_bytes(P, 2, 8, True, False) == (15_231_233_024, 1_903_904_128, 11_423_424_768)
    assert sum(model_state_bytes(P, 2, 8, True, False)) == 28_558_561_920  # 2P + 14P/8
    # ZeRO-1: 2P + 2P + 12P/8 = 30,462,466,048 + 11,423,424,768
    assert sum(model_state_bytes(P, 1, 8, True, False)) == 41_885_890_816
    # ZeRO-0: 16P = 121,849,864,192 however many GPUs; fp32 (4 + 4 + 8 bytes) is 16P too
    assert sum(model_state_bytes(P, 0, 8, True, False)) == 121_849_864_192
    assert model_state_bytes(P, 0, 1, False, False) == (30_462_466_048, 30_462_466_048, 60_924_932_096)
    # CPU offload moves the 12P optimizer part off the GPU: ZeRO-3 keeps 2P/8 + 2P/8, ZeRO-2 2P + 2P/8
    assert model_state_bytes(P, 3, 8, True, True) == (1_903_904_128, 1_903_904_128, 0)
    assert model_state_bytes(P, 2, 8, True, True) == (15_231_233_024, 1_903_904_128, 0)


def test_logits_per_copy() -> None:
    # a 2-row micro-batch of 1024 tokens, unchunked: 2*1024 tokens x 152064 x 4 bytes
    assert logit_bytes(2 * 1024, 152064, 0) == 1_245_708_288
    # a worker's 16 pairs in one pass, unchunked: 32*1024 x 152064 x 4 = the ~20 GB of the issue
    assert logit_bytes(32 * 1024, 152064, 0) == 19_931_332_608
    # chunked: 4096 x 152064 x 4 whatever the micro-batch; a smaller micro-batch keeps its own size
    assert logit_bytes(32 * 1024, 152064, 4096) == 2_491_416_576
    assert logit_bytes(2 * 1024, 152064, 4096) == 1_245_708_288


def test_kv_cache_per_token() -> None:
    assert kv_bytes_per_token(QWEN_7B, 2) == 57_344  # 2 (K, V) x 28 layers x 4 KV heads x 128 x 2 bytes
    assert kv_bytes_per_token(QWEN_7B, 2, tensor_parallel=2) == 28_672  # 2 KV heads on each GPU
    assert kv_bytes_per_token(QWEN_7B, 2, tensor_parallel=8) == 14_336  # 4 heads over 8 GPUs: 1 each


def test_activations() -> None:
    # a layer per token, bf16: 2(4h + 2q + 2kv + 4f) = 2(14,336 + 7,168 + 1,024 + 75,776) = 196,608
    # 4096 tokens (2 pairs of 1024): all 28 layers' = 28 x 4096 x 196,608
    assert activation_bytes(QWEN_7B, 4096, 2, checkpointing=False) == 22_548_578_304
    # checkpointed: 28 layer inputs of 2 x 3584 bytes + one layer's = 200,704 + 196,608 = 397,312 per token
    assert activation_bytes(QWEN_7B, 4096, 2, checkpointing=True) == 1_627_389_952


def test_the_7b_recipe_fits_its_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", RECIPE]) == 0
    out = capsys.readouterr().out
    assert "7,615,616,512 parameters" in out and "57,344 B each" in out
    assert max(len(line) for line in out.splitlines()) <= 100
    stages = {p.stage: p for p in plan_run(load_config(RECIPE)).stages}
    assert set(stages) == {"sample", "reference", "train"}  # the recipe runs no warm-up and no control
    assert (stages["sample"].gpus, stages["reference"].gpus, stages["train"].gpus) == (4, 1, 4)
    assert all(not p.problem and p.total <= 80 * 2**30 for p in stages.values())
    # ZeRO-3 over 4 in bf16: weights 2P/4 = 3,807,808,256, Adam 12P/4 = 22,846,849,536 (P = 7,615,616,512)
    assert (stages["train"].weights, stages["train"].optimizer) == (3_807_808_256, 22_846_849_536)
    (train_8,) = [p for p in plan_run(load_config(RECIPE, ["train.num_workers=8"])).stages if p.stage == "train"]
    # ZeRO-3 over 8 x 80 GB: weights 2P/8 = 1,903,904,128, gradients the same, Adam 12P/8 = 11,423,424,768
    assert (train_8.gpus, train_8.weights, train_8.optimizer) == (8, 1_903_904_128, 11_423_424_768)


def test_a_recipe_that_cannot_fit_is_refused_with_what_to_change(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", RECIPE, "train.num_workers=1", "train.zero_stage=0"]) == 2
    out, err = capsys.readouterr()
    assert "train" in out  # the table is printed first
    assert "raypipe: config error:" in err and "Traceback" not in err
    assert "train: 123.5 GiB per GPU, more than train.gpu_memory_gib=80" in err
    assert "train.zero_stage=3 train.num_workers=2" in err and "train.offload_optimizer=true" in err


def test_run_refuses_before_starting_anything(monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    def started(*args: object) -> None:
        raise AssertionError("the run started")

    monkeypatch.setattr("raypipe.cli.run_console", started)
    assert main(["run", RECIPE, "train.num_workers=1", "train.zero_stage=0"]) == 2
    assert "train.zero_stage=3" in capsys.readouterr().err


def test_a_cpu_run_is_not_planned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU default stays as it was: no plan (no config.json read), no refusal."""
    class Started(Exception):
        pass

    def started(*args: object) -> None:
        raise Started

    monkeypatch.setattr("raypipe.cli.run_console", started)
    monkeypatch.setattr(plan, "plan_run", lambda cfg: pytest.fail("planned a CPU run"))
    with pytest.raises(Started):
        main(["run", "conf/quickstart.yaml", "train.gpu_memory_gib=0.001"])


def test_the_tiny_model_is_planned_from_its_model_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "conf/quickstart.yaml"]) == 0
    out = capsys.readouterr().out
    assert "the tiny model" in out and "train.use_gpu=false" in out
    assert {p.stage for p in plan_run(load_config("conf/quickstart.yaml")).stages} == {
        "sample", "warmup", "reference", "train", "control"}


def test_model_path_config_wins_and_a_missing_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 256, "intermediate_size": 512,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4,
                                                      "vocab_size": 1000, "tie_word_embeddings": True}))
    shape, source = model_shape(load_config(RECIPE, [f"model.path={tmp_path}"]))
    assert (shape.hidden, shape.kv_heads, shape.tied, source) == (256, 4, True, str(tmp_path / "config.json"))
    with pytest.raises(ConfigError, match="model.config_json: nope.json not found"):
        model_shape(load_config(RECIPE, ["model.config_json=nope.json"]))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="'hidden_size'"):
        model_shape(load_config(RECIPE, [f"model.path={tmp_path}"]))


def test_engines_that_cannot_fit_are_refused() -> None:
    short = plan_run(load_config(RECIPE, ["engine.max_model_len=1000000"])).stages[0]
    assert "fewer than one engine.max_model_len=1000000 sequence" in short.problem
    small = plan_run(load_config(RECIPE, ["train.gpu_memory_gib=16"])).stages[0]
    assert "the weights (14.2 GiB per GPU)" in small.problem
    assert "engine.tensor_parallel_size=2 engine.num_gpus=2 -> KV cache" in small.problem and "fits" in small.problem
    odd = plan_run(load_config(RECIPE, ["engine.tensor_parallel_size=3", "engine.num_gpus=3"])).stages[0]
    assert odd.gpus == 12 and "does not divide the model's 28 attention heads" in odd.problem


def test_new_fields_are_validated() -> None:
    with pytest.raises(ConfigError, match="engine.tensor_parallel_size=0"):
        load_config(None, ["engine.tensor_parallel_size=0"])
    with pytest.raises(ConfigError, match="train.micro_batch_size=0"):
        load_config(None, ["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="zero_stage >= 1"):
        load_config(None, ["train.offload_optimizer=true", "train.zero_stage=0"])


def test_reference_plan_follows_the_scoring_settings() -> None:
    """The pipeline scores with cfg.reference (StageContext._scoring); the plan reads the same section."""
    plans = [next(p for p in plan_run(load_config(RECIPE, overrides)).stages if p.stage == "reference")
             for overrides in ([], ["reference.batch_size=16"], ["reference.num_actors=2"])]
    assert plans[0].gpus == 1 and plans[2].gpus == 2
    assert "32 rows x 2 seq x 1024 tokens" in plans[0].detail and "16 rows" in plans[1].detail
    # activations and logits scale with the batch (weights do not): half the rows, half of each
    assert (plans[1].activations * 2, plans[1].weights) == (plans[0].activations, plans[0].weights)
