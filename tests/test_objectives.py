"""Training objectives on a real (tiny, random) model, without Ray: how rows become losses.

The DeepSpeed engine wraps a `TokenLogProbs`, which is called the same way (`model(input_ids=...,
attention_mask=..., loss_mask=...)`, `.device`), so each objective's `step` runs here on the plain wrapped
model. The expected values come from the plain full-logits forward of the HF model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.data.synthetic import generate_split
from raypipe.config import TaskConfig
from raypipe.train.collate import pad_sequences
from raypipe.train.logprobs import TokenLogProbs
from raypipe.train.losses import sequence_logps, sft_loss, token_logps
from raypipe.train.objectives import AFTObjective, PreferenceObjective, SFTObjective
from tests.test_aft_loss import slow_aft


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir: Path):
    torch.manual_seed(0)
    return (TokenLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4096),
            AutoTokenizer.from_pretrained(tiny_model_dir))


def _row(tok, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=False).input_ids
    c = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return p + c, [0] * len(p) + [1] * len(c)


def _problems(n: int = 4):
    return generate_split(TaskConfig(), "test", n)


def _logps(model, ids, mask, average=False) -> list[float]:
    batch, attn, loss_mask = pad_sequences(ids, mask, 0)
    with torch.no_grad():
        logits = model.model(input_ids=batch, attention_mask=attn).logits
    return sequence_logps(token_logps(logits, batch), loss_mask, average=average).tolist()


def _wrong(p) -> str:
    return p.solution.replace(f"is {p.answer}.", f"is {p.answer + 1}.")


def test_ipo_at_the_reference_is_the_squared_target_margin(model_and_tok) -> None:
    model, tok = model_and_tok
    rows = []
    for p in _problems():
        c_ids, c_mask = _row(tok, p.prompt, p.solution)
        r_ids, r_mask = _row(tok, p.prompt, _wrong(p))
        ref_c, ref_r = _logps(model, [c_ids, r_ids], [c_mask, r_mask])
        rows.append({"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids, "rejected_mask": r_mask,
                     "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r})
    for loss_type, beta, expected in (("ipo", 0.5, 1.0), ("ipo", 0.25, 4.0), ("sigmoid", 0.1, 0.6931471805599453)):
        objective = PreferenceObjective(loss_type, beta=beta)
        loss, stats = objective.step(model, [objective.read(r, 128) for r in rows], 0)
        assert loss.item() == pytest.approx(expected, abs=1e-5), loss_type  # IPO: (0 - 1/(2 beta))^2
        assert torch.allclose(stats["chosen"], torch.zeros(4, dtype=stats["chosen"].dtype), atol=1e-5)
    # off the reference, IPO compares token-AVERAGED log-ratios: shift the summed reference log-probs by d_c, d_r
    d_c, d_r, beta = 3.0, -2.0, 0.5
    shifted = [{**r, "ref_chosen_logps": r["ref_chosen_logps"] - d_c, "ref_rejected_logps": r["ref_rejected_logps"] - d_r}
               for r in rows]
    objective = PreferenceObjective("ipo", beta=beta)
    loss, _ = objective.step(model, [objective.read(r, 128) for r in shifted], 0)
    n_c = [sum(r["chosen_mask"][1:]) for r in rows]
    n_r = [sum(r["rejected_mask"][1:]) for r in rows]
    expected = sum((d_c / c - d_r / n - 1 / (2 * beta)) ** 2 for c, n in zip(n_c, n_r)) / len(rows)
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_preference_objective_rejects_unknown_loss() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceObjective("hinge")


def _aft_rows(tok) -> list[dict]:
    rows = []
    problems, worked_problems = _problems(), generate_split(TaskConfig(), "sft", 4)
    for p, w in zip(problems, worked_problems):
        right, right_mask = _row(tok, p.prompt, p.solution)
        wrong, wrong_mask = _row(tok, p.prompt, _wrong(p))
        worked, worked_mask = _row(tok, w.prompt, w.solution)
        rows.append({"sft_ids": worked, "sft_mask": worked_mask, "cand_ids": [right, wrong],
                     "cand_mask": [right_mask, wrong_mask], "cand_positive": [True, False],
                     "cand_rank": [1000, 3]})
    rows.append({**rows[0], "cand_ids": [rows[0]["cand_ids"][0]], "cand_mask": [rows[0]["cand_mask"][0]],
                 "cand_positive": [True], "cand_rank": [1000]})  # all-positive question: L_VFT only
    return rows


def test_aft_loss_is_vft_plus_weighted_alignment(model_and_tok) -> None:
    model, tok = model_and_tok
    rows = _aft_rows(tok)
    batch = [AFTObjective().read(r, 128) for r in rows]
    only_vft, _ = AFTObjective("bc", weight=0.0).step(model, batch, 0)
    ids, attn, mask = pad_sequences([r["sft_ids"] for r in rows], [r["sft_mask"] for r in rows], 0)
    with torch.no_grad():
        expected = sft_loss(token_logps(model.model(input_ids=ids, attention_mask=attn).logits, ids), mask)
    assert only_vft.item() == pytest.approx(expected.item(), rel=1e-5)
    full, stats = AFTObjective("bc", beta=0.5, weight=2.0).step(model, batch, 0)
    assert full.item() == pytest.approx(stats["aft/vft"].item() + 2.0 * stats["aft/constrained"].item(), rel=1e-5)
    scores = [_logps(model, r["cand_ids"], r["cand_mask"], average=True) for r in rows]
    right_order = sum(s[0] > s[1] for s in scores[:4]) / 4
    assert stats["aft/pair_accuracy"].item() == pytest.approx(right_order)
    flat = [x for s in scores for x in s]  # candidates scored one row at a time, outside the objective
    groups = [g for g, s in enumerate(scores) for _ in s]
    positive = [p for r in rows for p in r["cand_positive"]]
    assert stats["aft/constrained"].item() == pytest.approx(slow_aft(flat, positive, groups, "bc", 0.5), rel=1e-4)
    with_positives, _ = AFTObjective("bc", weight=0.0, mle_on_positives=True).step(model, batch, 0)
    assert with_positives.item() != pytest.approx(only_vft.item()), "positives join the NLL"


def _margin_gain(tiny_model_dir: Path, weight: float) -> float:
    """How much 5 SGD steps of AFT (dc) widen the right-minus-wrong score margin."""
    torch.manual_seed(0)
    model = TokenLogProbs(AutoModelForCausalLM.from_pretrained(tiny_model_dir), 4096)
    rows = _aft_rows(AutoTokenizer.from_pretrained(tiny_model_dir))[:4]
    objective = AFTObjective("dc", weight=weight)
    batch = [objective.read(r, 128) for r in rows]
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    _, before = objective.step(model, batch, 0)
    for _ in range(5):
        loss, _ = objective.step(model, batch, 0)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    _, after = objective.step(model, batch, 0)
    return float(after["aft/pair_margin"] - before["aft/pair_margin"])


def test_the_alignment_term_raises_right_chains_above_wrong_ones(tiny_model_dir: Path) -> None:
    with_alignment, vft_only = _margin_gain(tiny_model_dir, 1.0), _margin_gain(tiny_model_dir, 0.0)
    assert with_alignment > 0 and with_alignment > vft_only + 1e-3, (with_alignment, vft_only)


def test_sft_objective_reads_and_counts_tokens() -> None:
    objective = SFTObjective()
    row = objective.read({"input_ids": [1, 2, 3, 4], "loss_mask": [0, 0, 1, 1]}, 3)
    assert row == ([2, 3, 4], [0, 1, 1]) and objective.tokens(row) == 3
