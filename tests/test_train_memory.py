"""The training path's memory features, on CPU without Ray: chunked log-probs equal the full-logits ones
(values and gradients), micro-batches add up to the whole batch's gradient (every objective, then DeepSpeed's
ZeRO-2/3 with and without optimiser offload through the loop's own `_train_step`), gradient checkpointing
changes nothing numerically, weights load in the training dtype, and the DeepSpeed config and TrainConfig
checks."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.config import ConfigError, OptimConfig, TaskConfig, TrainConfig, load_config
from raypipe.data.synthetic import generate_split
from raypipe.train.collate import pack_lines, pad_sequences
from raypipe.train.logprobs import TokenLogProbs, load_policy
from raypipe.train.loop import _Interval, _train_step, build_ds_config
from raypipe.train.losses import sequence_logps
from raypipe.train.objectives import AFTObjective, PreferenceObjective, SFTObjective
from raypipe.train.reference import _SequenceScorer
from raypipe.train.trainer import TrainJob
from raypipe.update_config import LoRAConfig


def _rows(tok, n: int, split: str = "test") -> list[tuple[list[int], list[int]]]:
    """n (ids, mask) rows of different lengths: prompt unscored, worked solution + EOS scored."""
    rows = []
    for p in generate_split(TaskConfig(), split, n):
        prompt = tok(p.prompt, add_special_tokens=False).input_ids
        answer = tok(p.solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _model(tiny_model_dir: Path, dtype: torch.dtype = torch.float64):
    """fp64, so that comparisons of sums over different groupings test the formula, not rounding."""
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def _assert_close_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rel: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        scale = b[name].abs().max().clamp(min=1e-30)
        assert ((a[name] - b[name]).abs().max() / scale).item() <= rel, name


# ---------------------------------------------------------------- chunked log-probs

@pytest.mark.parametrize("chunk", [1, 7, 50, 4096])
def test_chunked_logprobs_equal_the_full_logits_path(tiny_model_dir: Path, tok, chunk: int) -> None:
    model = _model(tiny_model_dir, torch.float32)
    rows = _rows(tok, 5)
    ids, attn, mask = pad_sequences([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    scored = int(mask[:, 1:].sum())
    assert scored % 7 and scored % 50 and (attn == 0).any() and (mask[:, :4] == 0).all(), "padding, prompts"
    weights = torch.randn(mask.shape[0], generator=torch.Generator().manual_seed(0))
    sizes: list[int] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[:-1].numel()))
    results = []
    for path in (TokenLogProbs(model, 0), TokenLogProbs(model, chunk)):
        sizes.clear()
        logps = path(input_ids=ids, attention_mask=attn, loss_mask=mask)
        (sequence_logps(logps, mask) * weights).sum().backward()
        results.append((logps.detach(), _grads(model), list(sizes)))
    hook.remove()
    (full, full_grads, full_sizes), (chunked, chunked_grads, chunked_sizes) = results
    torch.testing.assert_close(chunked, full, rtol=1e-5, atol=1e-5)
    assert (chunked[mask[:, 1:] == 0] == 0).all() and (chunked[mask[:, 1:] == 1] < 0).all()
    _assert_close_grads(chunked_grads, full_grads, 1e-5)
    assert full_sizes == [ids.numel()], "the plain path applies the head to every position"
    calls = math.ceil(scored / chunk)
    assert sum(chunked_sizes) == 2 * scored and len(chunked_sizes) == 2 * calls, "forward, then recomputed"
    assert max(chunked_sizes) == min(chunk, scored), "never more than `chunk` positions' logits at once"


def test_chunked_path_with_nothing_scored_still_backpropagates(tiny_model_dir: Path, tok) -> None:
    model = _model(tiny_model_dir, torch.float32)
    ids, attn, mask = pad_sequences([r[0] for r in _rows(tok, 2)], [r[1] for r in _rows(tok, 2)], 0)
    logps = TokenLogProbs(model, 16)(input_ids=ids, attention_mask=attn, loss_mask=torch.zeros_like(mask))
    assert logps.abs().sum() == 0 and logps.requires_grad
    logps.sum().backward()


def test_models_whose_logits_are_not_the_plain_head_are_refused(tiny_model_dir: Path) -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           head_dim=16))
    assert gemma.config.final_logit_softcapping
    with pytest.raises(ConfigError, match="final_logit_softcapping.*logits_chunk_tokens=0"):
        TokenLogProbs(gemma, 4096)
    TokenLogProbs(gemma, 0)  # the plain path runs the model's own forward, soft-capping included
    model = _model(tiny_model_dir, torch.float32)
    model.config.logit_scale = 0.25
    with pytest.raises(ConfigError, match="logit_scale"):
        TokenLogProbs(model, 64)
    model.config.logit_scale = 1.0
    TokenLogProbs(model, 64)


# ---------------------------------------------------------------- packing

def test_pack_lines_first_fit_decreasing() -> None:
    assert pack_lines([5, 2, 3, 5, 1], 5) == [[0], [3], [2, 1], [4]]
    lines = pack_lines([7, 1, 4, 3, 2, 6, 0], 7)
    assert sorted(r for line in lines for r in line) == list(range(7))
    assert all(sum([7, 1, 4, 3, 2, 6, 0][r] for r in line) <= 7 for line in lines) and len(lines) == 4
    with pytest.raises(ValueError):
        pack_lines([8], 7)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk", [0, 16])
def test_packed_rows_score_as_unpacked(tiny_model_dir: Path, tok, attention: str, chunk: int) -> None:
    """Rows of 20-70 tokens (prompts unscored, one row a single token) packed into fewer lines: the same
    log-probs and gradients, so no row attends to another and positions restart per row."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64,
                                                 attn_implementation=attention)
    rows = _rows(tok, 6) + [(r[0][:20], r[1][:20]) for r in _rows(tok, 3, "sft")] + [([5], [1])]
    ids, attn, mask = pad_sequences([r[0] for r in rows], [r[1] for r in rows], tok.pad_token_id)
    lines: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: lines.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    results = []
    for packing in (False, True):
        path = TokenLogProbs(model, chunk, packing=packing)
        logps = path(input_ids=ids, attention_mask=attn, loss_mask=mask)
        (sequence_logps(logps, mask) * torch.arange(1.0, len(rows) + 1, dtype=logps.dtype)).sum().backward()
        results.append((logps.detach(), _grads(model)))
    hook.remove()
    assert lines == [len(rows), len(pack_lines(attn.sum(-1).tolist(), ids.shape[1]))] and lines[1] <= 7
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-9, atol=1e-9)
    _assert_close_grads(results[1][1], results[0][1], 1e-8)


def test_packed_preference_loss_equals_unpacked(tiny_model_dir: Path, tok) -> None:
    """Chosen and rejected sides of the same pairs share the packed lines (rejected sides cut to 25
    tokens)."""
    objective = PreferenceObjective("sigmoid", beta=0.1, nll_weight=0.5)
    batch = [(c, cm, r[:25], rm[:25], *ref) for c, cm, r, rm, *ref in _batch(objective, "preference", tok)]
    model = _model(tiny_model_dir)
    lines: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(
        lambda m, args, kwargs: lines.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    losses = [objective.step(TokenLogProbs(model, 4096, packing=packing), batch, tok.pad_token_id)
              for packing in (False, True)]
    hook.remove()
    assert lines[0] == 16 and lines[1] <= 12, lines
    assert losses[1][0].item() == pytest.approx(losses[0][0].item(), rel=1e-10)
    torch.testing.assert_close(losses[1][1]["chosen"], losses[0][1]["chosen"], rtol=1e-9, atol=1e-9)


def _step_pairs(tok) -> list[tuple[list[int], list[int], list[int], list[int]]]:
    """Step-DPO-shaped pairs: a worked solution against the same one with its last tokens changed, scored from
    partway into the shared part; plus a pair with nothing in common, one whose chosen side is a prefix of its
    rejected side, and identical sides."""
    pairs = []
    for k, (ids, mask) in enumerate(_rows(tok, 6)):
        cut = len(ids) - 3 - k % 3
        rejected = ids[:cut] + [(t + 7) % len(tok) for t in ids[cut:]] + ids[-k % 2:] * (k % 2)
        scored = max(1, cut - 4)
        pairs.append((ids, [0] * scored + [1] * (len(ids) - scored),
                      rejected, [0] * scored + [1] * (len(rejected) - scored)))
    (a, am), (b, bm) = _rows(tok, 2, "sft")
    pairs += [([9] + a, [0] + am, [11] + b, [0] + bm), (a[:20], am[:20], a[:30], am[:30]), (b, bm, b, bm)]
    return pairs


# ---------------------------------------------------------------- micro-batches (gradient accumulation)

def _preference_rows(tok) -> list[dict]:
    rows = []
    for k, ((c_ids, c_mask), (r_ids, r_mask)) in enumerate(zip(_rows(tok, 8), _rows(tok, 8, "sft"))):
        rows.append({"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids,
                     "rejected_mask": r_mask, "ref_chosen_logps": -20.0 - k,
                     "ref_rejected_logps": -30.0 + 2 * k})
    return rows


def _aft_rows(tok) -> list[dict]:
    """8 questions: 1-3 candidates each, some all-positive or all-negative (nothing to rank), ranks of 3
    levels."""
    chains, rows = _rows(tok, 16), []
    for k, (sft_ids, sft_mask) in enumerate(_rows(tok, 8, "sft")):
        n = 1 + k % 3
        cands = [chains[(k + j) % 16] for j in range(n)]
        positive = [[True], [True, False], [False, True, False], [False], [True, True],
                    [True, False, False], [False, False], [True, False, True]][k][:n]
        positive += [False] * (n - len(positive))
        rows.append({"sft_ids": sft_ids, "sft_mask": sft_mask, "cand_ids": [c[0] for c in cands],
                     "cand_mask": [c[1] for c in cands], "cand_positive": positive,
                     "cand_rank": [1000 if p else j + 1 for j, p in enumerate(positive)]})
    return rows


OBJECTIVES = [
    (SFTObjective(), "sft"),
    (PreferenceObjective("sigmoid", beta=0.1, nll_weight=0.5), "preference"),
    (PreferenceObjective("ipo", beta=0.5), "preference"),
    (AFTObjective("bc", beta=0.5, weight=1.0, mle_on_positives=True), "aft"),
    (AFTObjective("rank", beta=0.5, weight=2.0), "aft"),
]


def _batch(objective, kind: str, tok) -> list[tuple]:
    if kind == "sft":
        raw = [{"input_ids": i, "loss_mask": m} for i, m in _rows(tok, 8)]
    else:
        raw = _preference_rows(tok) if kind == "preference" else _aft_rows(tok)
    return [objective.read(r, 128) for r in raw]


@pytest.mark.parametrize("objective,kind", OBJECTIVES, ids=lambda o: getattr(o, "loss_type", None) or str(o))
@pytest.mark.parametrize("micro", [2, 3])
def test_micro_batches_add_up_to_the_whole_batch(tiny_model_dir: Path, tok, objective, kind: str,
                                                 micro: int) -> None:
    model = TokenLogProbs(_model(tiny_model_dir), 32)
    batch = _batch(objective, kind, tok)
    loss, stats = objective.step(model, batch, tok.pad_token_id)
    loss.backward()
    whole = _grads(model)
    totals = objective.totals(batch)
    parts = [objective.step(model, batch[i:i + micro], tok.pad_token_id, totals)
             for i in range(0, len(batch), micro)]
    for part_loss, _ in parts:
        part_loss.backward()
    parts = [(part_loss.detach(), part_stats) for part_loss, part_stats in parts]
    summed = _grads(model)
    assert sum(p.item() for p, _ in parts) == pytest.approx(loss.item(), rel=1e-10, abs=1e-12)
    _assert_close_grads(summed, whole, 1e-9)
    for key, value in stats.items():
        pieces = [s[key] for _, s in parts]
        merged = sum(pieces) if value.dim() == 0 else torch.cat(pieces)
        torch.testing.assert_close(merged, value, rtol=1e-9, atol=1e-12)
    if kind == "aft":
        assert totals["groups"] >= 3 and totals["pairs"] >= 3 and stats["aft/constrained"] > 0


@pytest.fixture(scope="module")
def process_group():
    """A one-process gloo group, as DeepSpeed needs one even for a single rank."""
    import deepspeed
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    yield
    dist.destroy_process_group()


LR = 1e3
"""SGD with a large step: the update -LR * grad dwarfs the weights, so weight differences measure
gradients."""


def _one_step(tiny_model_dir: Path, cfg: TrainConfig, objective, batch: list[tuple], pad_id: int,
              per_rank: int) -> tuple[dict[str, torch.Tensor], _Interval]:
    """One optimiser step of the loop's `_train_step` on a single-rank DeepSpeed engine (SGD, no clipping)."""
    import deepspeed

    ds = build_ds_config(OptimConfig(batch_size=per_rank, max_grad_norm=0.0), cfg, 1)
    del ds["optimizer"]
    ds.update(zero_force_ds_cpu_optimizer=False, zero_allow_untested_optimizer=True)  # SGD, also offloaded
    model = load_policy(str(tiny_model_dir), cfg, None)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR),
                                      config=ds)
    job = TrainJob(objective=objective, model_dir=str(tiny_model_dir), output_dir="", data_path="")
    interval = _Interval()
    _train_step(engine, job, batch, pad_id, interval)
    zero3 = cfg.zero_stage == 3
    state = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
    return {k: v.detach().clone() for k, v in state.items()}, interval


@pytest.mark.parametrize("stage,offload", [(2, False), (3, False), (2, True), (3, True)])
def test_deepspeed_accumulation_equals_one_batch(process_group, tiny_model_dir: Path, tok, stage: int,
                                                 offload: bool) -> None:
    """8-row batches and a 5-row last batch (3 micro-batches of 2 where the config says 4), SFT and AFT."""
    for objective, kind in (OBJECTIVES[0], OBJECTIVES[3]):
        for rows in (_batch(objective, kind, tok), _batch(objective, kind, tok)[:5]):
            one, one_log = _one_step(tiny_model_dir, TrainConfig(zero_stage=stage), objective, rows,
                                     tok.pad_token_id, 8)
            accumulating = TrainConfig(zero_stage=stage, micro_batch_size=2, offload_optimizer=offload,
                                       logits_chunk_tokens=16)
            acc, acc_log = _one_step(tiny_model_dir, accumulating, objective, rows, tok.pad_token_id, 8)
            start = {f"model.{k}": v for k, v in _model(tiny_model_dir, torch.float32).state_dict().items()}
            _assert_close_grads({k: start[k] - acc[k] for k in start}, {k: start[k] - one[k] for k in start},
                                1e-5)
            assert acc_log.steps == one_log.steps == 1 and acc_log.tokens == one_log.tokens
            assert float(acc_log.loss) == pytest.approx(float(one_log.loss), rel=1e-5)
            assert acc_log.stats.keys() == one_log.stats.keys()
            for key in one_log.stats:
                torch.testing.assert_close(acc_log.stats[key][0], one_log.stats[key][0], rtol=1e-5, atol=1e-6)


def test_deepspeed_zero3_step_with_shared_prefixes_equals_the_padded_one(process_group, tiny_model_dir: Path,
                                                                         tok) -> None:
    """`pairs=True` reaches TokenLogProbs through DeepSpeed's engine, and ZeRO-3's gathered layers take the 4D
    mask: one DPO step with shared prefixes and micro-batches of 2 pairs moves the weights as the padded step."""
    objective = PreferenceObjective("sigmoid", beta=0.1)
    rows = [(*p, -20.0 - k, -21.0 - k) for k, p in enumerate(_step_pairs(tok))]
    one, one_log = _one_step(tiny_model_dir, TrainConfig(zero_stage=3), objective, rows, tok.pad_token_id, 8)
    shared = TrainConfig(zero_stage=3, micro_batch_size=2, logits_chunk_tokens=16, share_prefix=True)
    acc, acc_log = _one_step(tiny_model_dir, shared, objective, rows, tok.pad_token_id, 8)
    start = {f"model.{k}": v for k, v in _model(tiny_model_dir, torch.float32).state_dict().items()}
    _assert_close_grads({k: start[k] - acc[k] for k in start}, {k: start[k] - one[k] for k in start}, 1e-4)
    assert float(acc_log.loss) == pytest.approx(float(one_log.loss), rel=1e-5)


# ---------------------------------------------------------------- checkpointing, dtype, configs

@pytest.mark.parametrize("lora", [None, LoRAConfig(rank=4, alpha=8, dropout=0.0)])
def test_gradient_checkpointing_changes_no_loss_or_gradient(tiny_model_dir: Path, tok, lora) -> None:
    objective = SFTObjective()
    batch = _batch(objective, "sft", tok)
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # LoRA's A matrices start random
        model = load_policy(str(tiny_model_dir), TrainConfig(gradient_checkpointing=checkpointing), lora)
        assert model.model.is_gradient_checkpointing == checkpointing and model.training
        loss, _ = objective.step(model, batch, tok.pad_token_id)
        loss.backward()
        results.append((loss.item(), _grads(model)))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    _assert_close_grads(results[1][1], results[0][1], 1e-5)
    if lora is not None:
        assert all("lora_" in name for name in results[0][1]), "only the adapters train"


def test_weights_load_in_the_training_dtype(tiny_model_dir: Path) -> None:
    for bf16, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        assert load_policy(str(tiny_model_dir), TrainConfig(bf16=bf16), None).model.dtype == dtype
        scorer = _SequenceScorer(str(tiny_model_dir), 64, False, 1, ("chosen",), "ref_", False, bf16=bf16,
                                 logits_chunk_tokens=4096)
        assert scorer.model.model.dtype == dtype and scorer.model.chunk_tokens == 4096


def test_deepspeed_config_for_micro_batches_and_offload() -> None:
    plain = build_ds_config(OptimConfig(batch_size=16), TrainConfig(num_workers=2), 2)
    assert (plain["train_micro_batch_size_per_gpu"], plain["gradient_accumulation_steps"],
            plain["train_batch_size"]) == (8, 1, 16)
    assert "offload_optimizer" not in plain["zero_optimization"]
    assert plain["optimizer"]["params"]["torch_adam"]
    accumulated = build_ds_config(OptimConfig(batch_size=16), TrainConfig(micro_batch_size=3, zero_stage=3,
                                                                          offload_optimizer=True), 2)
    assert (accumulated["train_micro_batch_size_per_gpu"], accumulated["gradient_accumulation_steps"],
            accumulated["train_batch_size"]) == (3, 3, 18), "DeepSpeed's bookkeeping; the loop splits 8 rows"
    assert accumulated["zero_optimization"] == {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                                                "offload_optimizer": {"device": "cpu", "pin_memory": True}}
    assert build_ds_config(OptimConfig(batch_size=8), TrainConfig(micro_batch_size=64), 1)[
        "train_micro_batch_size_per_gpu"] == 8, "never more than the per-worker batch"


@pytest.mark.parametrize("override,message", [
    ("train.micro_batch_size=0", "micro_batch_size"),
    ("train.logits_chunk_tokens=-1", "logits_chunk_tokens"),
    ("train.zero_stage=0", "offload_optimizer needs train.zero_stage >= 1"),
])
def test_bad_train_settings_are_config_errors(override: str, message: str) -> None:
    extra = ["train.offload_optimizer=true"] if "zero_stage" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override, *extra])
    load_config(None, ["train.micro_batch_size=4", "train.logits_chunk_tokens=0", "train.zero_stage=1",
                       *extra])
