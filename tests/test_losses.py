"""raypipe.train.losses against hand-computed values (fast, CPU, no model)."""

from __future__ import annotations

import math

import pytest
import torch

from raypipe.train.losses import (dpo_loss, ipo_loss, preference_metrics, sequence_logps, sft_loss,
                                  token_logps)

F64 = torch.float64


def log_softmax_entry(row: list[float], k: int) -> float:
    """log softmax(row)[k] written out: row[k] - log(sum(exp(row)))."""
    return row[k] - math.log(sum(math.exp(x) for x in row))


def log_sigmoid(x: float) -> float:
    return -math.log(1.0 + math.exp(-x))


# One sequence, vocab 3, T 4: logits[t] predicts labels[t + 1].
LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, -2.0], [0.3, 0.1, 0.7]]
LABELS = [2, 1, 0, 1]


def tiny() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([LOGITS], dtype=F64), torch.tensor([LABELS])


# ---------------------------------------------------------------- token / sequence log-probs

def test_token_logps_shift_and_values() -> None:
    logits, labels = tiny()
    out = token_logps(logits, labels)
    assert out.shape == (1, 3) and out.dtype == F64
    expected = [log_softmax_entry(LOGITS[t], LABELS[t + 1]) for t in range(3)]
    torch.testing.assert_close(out[0], torch.tensor(expected, dtype=F64))


def test_token_logps_upcasts_low_precision() -> None:
    logits, labels = tiny()
    out = token_logps(logits.to(torch.bfloat16), labels)
    assert out.dtype == torch.float32


def test_sequence_logps_equals_hand_sum_over_mask() -> None:
    logits, labels = tiny()
    mask = torch.tensor([[0, 1, 0, 1]])  # score labels at positions 1 and 3
    expected = log_softmax_entry(LOGITS[0], LABELS[1]) + log_softmax_entry(LOGITS[2], LABELS[3])
    assert sequence_logps(token_logps(logits, labels), mask).item() == pytest.approx(expected, abs=1e-12)
    mean = sequence_logps(token_logps(logits, labels), mask, average=True)
    assert mean.item() == pytest.approx(expected / 2, abs=1e-12)


def test_position_zero_label_is_never_scored() -> None:
    logits, labels = tiny()
    without = sequence_logps(token_logps(logits, labels), torch.tensor([[0, 1, 1, 1]]))
    with_first = sequence_logps(token_logps(logits, labels), torch.tensor([[1, 1, 1, 1]]))
    torch.testing.assert_close(without, with_first)
    changed = labels.clone()
    changed[0, 0] = 0  # the first label has no predicting position: changing it changes nothing
    every = torch.tensor([[1, 1, 1, 1]])
    torch.testing.assert_close(sequence_logps(token_logps(logits, changed), every), without)
    # ... but the logits at the last position predict nothing either.
    moved = logits.clone()
    moved[0, -1] = torch.tensor([9.0, -9.0, 0.0], dtype=F64)
    torch.testing.assert_close(sequence_logps(token_logps(moved, labels), every), without)


def test_tokens_outside_mask_change_nothing() -> None:
    logits, labels = tiny()
    mask = torch.tensor([[0, 0, 1, 0]])  # only label 2, predicted by logits[1]
    base = sequence_logps(token_logps(logits, labels), mask)
    noisy = logits.clone()
    noisy[0, 0] += torch.tensor([5.0, -3.0, 1.0], dtype=F64)
    noisy[0, 2] += torch.tensor([-2.0, 4.0, 0.5], dtype=F64)
    other = labels.clone()
    other[0, 1], other[0, 3] = 0, 2  # different (e.g. padding) ids outside the mask are harmless
    torch.testing.assert_close(sequence_logps(token_logps(noisy, other), mask), base)
    assert base.item() == pytest.approx(log_softmax_entry(LOGITS[1], LABELS[2]), abs=1e-12)


def test_batch_rows_are_independent_and_padded_rows_ok() -> None:
    logits, labels = tiny()
    batch_logits = torch.cat([logits, torch.zeros_like(logits)])
    batch_labels = torch.cat([labels, torch.tensor([[1, 0, 0, 0]])])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]])
    out = sequence_logps(token_logps(batch_logits, batch_labels), mask)
    assert out.shape == (2,)
    assert out[0].item() == pytest.approx(sum(log_softmax_entry(LOGITS[t], LABELS[t + 1]) for t in range(3)))
    assert out[1].item() == pytest.approx(math.log(1 / 3))  # uniform logits over 3 tokens


def test_zero_token_rows_give_zero_not_nan() -> None:
    logits, labels = tiny()
    logits = logits.repeat(2, 1, 1).requires_grad_()
    labels = labels.repeat(2, 1)
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])  # row 1: only position 0, which is never scored
    for average in (False, True):
        out = sequence_logps(token_logps(logits, labels), mask, average=average)
        assert out[1].item() == 0.0 and not torch.isnan(out).any()
        (grad,) = torch.autograd.grad(out.sum(), logits)
        assert not torch.isnan(grad).any() and grad[1].abs().sum() == 0
    assert sft_loss(token_logps(logits, labels), torch.zeros_like(mask)).item() == 0.0


def test_average_vs_sum() -> None:
    logits, labels = tiny()
    mask = torch.tensor([[0, 1, 1, 1]])
    total = sequence_logps(token_logps(logits, labels), mask)
    mean = sequence_logps(token_logps(logits, labels), mask, average=True)
    torch.testing.assert_close(mean, total / 3)


def test_no_eos_is_added_step_with_and_without_eos_differ() -> None:
    """The scorer scores exactly the masked tokens: a step [a, b] and [a, b, eos] have different log-probs.

    Step-DPO scores a reasoning step, which is not the end of the solution, so the collator must not append EOS
    to chosen / rejected steps: it would add log p(eos | step) (< 0) to one side of the margin.
    """
    a, b, eos, prompt = 0, 1, 2, 1
    logits = torch.tensor([[[0.2, 0.1, -0.3], [1.0, 0.0, 0.5], [0.0, 2.0, 0.1], [0.4, 0.3, 1.2]]], dtype=F64)
    no_eos = sequence_logps(token_logps(logits[:, :3], torch.tensor([[prompt, a, b]])),
                            torch.tensor([[0, 1, 1]]))
    with_eos = sequence_logps(token_logps(logits, torch.tensor([[prompt, a, b, eos]])),
                              torch.tensor([[0, 1, 1, 1]]))
    expected = log_softmax_entry([0.2, 0.1, -0.3], a) + log_softmax_entry([1.0, 0.0, 0.5], b)
    assert no_eos.item() == pytest.approx(expected, abs=1e-12)
    assert with_eos.item() == pytest.approx(expected + log_softmax_entry([0.0, 2.0, 0.1], eos), abs=1e-12)
    assert with_eos.item() < no_eos.item()


# ---------------------------------------------------------------- SFT

def test_sft_loss_is_token_level_mean_over_batch() -> None:
    logits, labels = tiny()
    batch_logits, batch_labels = logits.repeat(2, 1, 1), labels.repeat(2, 1)
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1]])  # 3 + 1 tokens: a token mean, not a mean of row means
    lp = [log_softmax_entry(LOGITS[t], LABELS[t + 1]) for t in range(3)]
    expected = -(lp[0] + lp[1] + lp[2] + lp[2]) / 4
    loss = sft_loss(token_logps(batch_logits, batch_labels), mask)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------- DPO / IPO

PC, PR = [-3.0, -5.0], [-4.0, -2.5]  # policy chosen / rejected summed log-probs, two examples
RC, RR = [-3.5, -4.0], [-3.0, -3.0]  # reference


def pref(requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=F64, requires_grad=requires_grad) for v in (PC, PR, RC, RR)]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_hand_values(beta: float) -> None:
    loss, chosen, rejected = dpo_loss(*pref(), beta=beta)
    # example 0: h = (-3 + 3.5) - (-4 + 3) = 0.5 + 1 = 1.5; example 1: h = (-5 + 4) - (-2.5 + 3) = -1 - 0.5 = -1.5
    h = [(PC[i] - RC[i]) - (PR[i] - RR[i]) for i in range(2)]
    assert h == [1.5, -1.5]
    expected = -(log_sigmoid(beta * 1.5) + log_sigmoid(beta * -1.5)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(chosen, torch.tensor([beta * 0.5, beta * -1.0], dtype=F64))
    torch.testing.assert_close(rejected, torch.tensor([beta * -1.0, beta * 0.5], dtype=F64))


def test_dpo_loss_at_reference_is_log2() -> None:
    pc, pr = torch.tensor([-7.0, -1.0], dtype=F64), torch.tensor([-2.0, -9.0], dtype=F64)
    for beta in (0.1, 0.5):
        loss, chosen, rejected = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
        assert chosen.abs().sum() == 0 and rejected.abs().sum() == 0


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_loss_hand_values(beta: float) -> None:
    loss, chosen, rejected = ipo_loss(*pref(), beta=beta)
    target = 1 / (2 * beta)  # 5 for beta 0.1, 1 for beta 0.5
    expected = ((1.5 - target) ** 2 + (-1.5 - target) ** 2) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    torch.testing.assert_close(chosen, torch.tensor([beta * 0.5, beta * -1.0], dtype=F64))


@pytest.mark.parametrize("fn", [dpo_loss, ipo_loss])
def test_gradients_reach_policy_logps_only(fn) -> None:
    pc, pr, rc, rr = pref(requires_grad=True)
    loss, chosen, rejected = fn(pc, pr, rc, rr, 0.1)
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    assert pc.grad.abs().sum() > 0 and pr.grad.abs().sum() > 0
    assert rc.grad is None and rr.grad is None
    assert not chosen.requires_grad and not rejected.requires_grad
    if fn is dpo_loss:  # d/dpc of -logsigmoid(beta h) / n = -beta * sigmoid(-beta h) / n
        beta, h0 = 0.1, 1.5
        assert pc.grad[0].item() == pytest.approx(-beta / (1 + math.exp(beta * h0)) / 2, abs=1e-12)
        assert pr.grad[0].item() == pytest.approx(beta / (1 + math.exp(beta * h0)) / 2, abs=1e-12)


def test_dpo_gradient_flows_through_sequence_logps_to_logits() -> None:
    logits, labels = tiny()
    logits = logits.repeat(2, 1, 1).requires_grad_()
    labels = labels.repeat(2, 1)
    logps = sequence_logps(token_logps(logits, labels), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]]))
    ref = logps.detach() - 0.1
    loss, _, _ = dpo_loss(logps[:1], logps[1:], ref[:1], ref[1:], 0.1)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert logits.grad[:, -1].abs().sum() == 0  # the last position predicts nothing


def test_preference_metrics() -> None:
    chosen = torch.tensor([0.5, -0.1, 0.2], dtype=F64)
    rejected = torch.tensor([0.1, 0.3, -0.4], dtype=F64)
    m = preference_metrics(chosen, rejected)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin"}
    assert all(type(v) is float for v in m.values())
    assert m["rewards/chosen"] == pytest.approx((0.5 - 0.1 + 0.2) / 3)
    assert m["rewards/rejected"] == pytest.approx((0.1 + 0.3 - 0.4) / 3)
    assert m["rewards/accuracy"] == pytest.approx(2 / 3)
    assert m["rewards/margin"] == pytest.approx((0.4 - 0.4 + 0.6) / 3)
