"""AFT's constrained alignment loss against hand-computed values and an independent slow implementation."""

from __future__ import annotations

import math

import pytest
import torch

from raypipe.train.losses import aft_loss

F64 = torch.float64


def slow_aft(scores: list[float], positive: list[bool], groups: list[int], constraint: str, beta: float,
             ranks: list[int] | None = None) -> float:
    """The METHODS.md formulas written out with plain floats and loops (no tensors, no logsumexp)."""
    levels = ranks if ranks is not None and constraint == "rank" else [int(p) for p in positive]
    losses = []
    for g in sorted(set(groups)):
        idx = [k for k, gk in enumerate(groups) if gk == g]
        pairs = [(a, b) for a in idx for b in idx if levels[a] > levels[b]]
        if not pairs:
            continue
        total = 0.0
        for a, b in pairs:
            total += math.exp(scores[b] - scores[a])
            if constraint in ("bc", "rank"):
                boundary = min(scores[c] for c in idx if levels[c] > levels[b]) - beta
                total += math.exp(2 * boundary - scores[a] - scores[b])
        losses.append(math.log(1.0 + total))
    return sum(losses) / len(losses) if losses else 0.0


def call(scores, positive, groups, constraint, beta=0.5, ranks=None) -> torch.Tensor:
    return aft_loss(torch.tensor(scores, dtype=F64, requires_grad=True), torch.tensor(positive),
                    torch.tensor(groups), constraint, beta, None if ranks is None else torch.tensor(ranks))


def test_dc_one_pair_by_hand() -> None:
    # s_p = -1, s_n = -0.5: log(1 + e^{0.5})
    assert call([-1.0, -0.5], [True, False], [0, 0], "dc").item() == pytest.approx(math.log(1 + math.exp(0.5)))


def test_bc_one_pair_by_hand() -> None:
    # B = -1 - 0.5 = -1.5, T = 2B - s_p = -2; terms e^{s_n - s_p} = e^{0.5}, e^{T - s_n} = e^{-1.5}
    expected = math.log(1 + math.exp(0.5) + math.exp(-1.5))
    assert call([-1.0, -0.5], [True, False], [0, 0], "bc", beta=0.5).item() == pytest.approx(expected)


@pytest.mark.parametrize("constraint", ["dc", "bc", "rank", "none"])
def test_matches_slow_implementation_on_random_groups(constraint: str) -> None:
    gen = torch.Generator().manual_seed(7)
    n = 40
    scores = (torch.randn(n, generator=gen, dtype=F64) - 1.0).tolist()
    positive = (torch.rand(n, generator=gen) < 0.4).tolist()
    groups = torch.randint(0, 9, (n,), generator=gen).tolist()
    ranks = [5 if p else int(r) for p, r in zip(positive, torch.randint(0, 4, (n,), generator=gen))]
    fast = call(scores, positive, groups, constraint, beta=0.3, ranks=ranks).item()
    assert fast == pytest.approx(slow_aft(scores, positive, groups, constraint, 0.3, ranks), rel=1e-10)


def test_rank_with_binary_ranks_equals_bc() -> None:
    args = ([-1.0, -0.7, -0.2, -2.0], [True, True, False, False], [0, 0, 0, 0])
    assert call(*args, "rank").item() == pytest.approx(call(*args, "bc").item())


def test_rank_orders_negatives_among_themselves() -> None:
    # no positive, but a negative that got further (rank 2) must outscore one that failed earlier (rank 1)
    loss = call([-1.0, -0.5], [False, False], [0, 0], "rank", beta=0.5, ranks=[2, 1])
    assert loss.item() == pytest.approx(slow_aft([-1.0, -0.5], [False, False], [0, 0], "rank", 0.5, [2, 1]))
    assert loss.item() > 0


def test_detached_constraint_never_moves_negatives() -> None:
    scores = torch.tensor([-1.0, -0.5, -0.2], dtype=F64, requires_grad=True)
    aft_loss(scores, torch.tensor([True, False, False]), torch.zeros(3, dtype=torch.long), "dc", 0.5).backward()
    assert scores.grad[0] < 0  # descent raises the positive
    assert scores.grad[1] == 0 and scores.grad[2] == 0


def test_boundary_pushes_a_negative_below_b_back_up_and_one_above_b_down() -> None:
    # positive at -1, beta 0.5: B = -1.5. Negative at -3 (below B) must rise; at -1.2 (above B) must fall.
    for s_n, sign in ((-3.0, -1), (-1.2, 1)):
        scores = torch.tensor([-1.0, s_n], dtype=F64, requires_grad=True)
        aft_loss(scores, torch.tensor([True, False]), torch.zeros(2, dtype=torch.long), "bc", 0.5).backward()
        assert torch.sign(scores.grad[1]).item() == sign, (s_n, scores.grad)
        assert scores.grad[0] < 0  # positives are always pushed up


def test_boundary_stationary_point_is_b() -> None:
    scores = torch.tensor([-1.0, -1.5], dtype=F64, requires_grad=True)  # negative exactly at B
    aft_loss(scores, torch.tensor([True, False]), torch.zeros(2, dtype=torch.long), "bc", 0.5).backward()
    assert scores.grad[1].item() == pytest.approx(0.0, abs=1e-12)


def test_unconstrained_keeps_pushing_negatives_down() -> None:
    scores = torch.tensor([-1.0, -9.0], dtype=F64, requires_grad=True)
    aft_loss(scores, torch.tensor([True, False]), torch.zeros(2, dtype=torch.long), "none", 0.5).backward()
    assert scores.grad[1] > 0  # even far below the positive, descent lowers it further


def test_degenerate_groups_are_left_out_of_the_mean() -> None:
    # group 0 all positive, group 1 all negative, group 2 mixed: only group 2 counts
    scores = [-1.0, -2.0, -0.3, -0.4, -1.0, -0.5]
    positive = [True, True, False, False, True, False]
    groups = [0, 0, 1, 1, 2, 2]
    only_mixed = call([-1.0, -0.5], [True, False], [0, 0], "dc").item()
    assert call(scores, positive, groups, "dc").item() == pytest.approx(only_mixed)


def test_no_mixed_group_gives_zero_and_backward_works() -> None:
    scores = torch.tensor([-1.0, -2.0], dtype=F64, requires_grad=True)
    loss = aft_loss(scores, torch.tensor([True, True]), torch.tensor([0, 1]), "bc", 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(scores.grad, torch.zeros(2, dtype=F64))


def test_large_violations_stay_finite() -> None:
    loss = call([-200.0, 0.0], [True, False], [0, 0], "bc")
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(200.0, rel=1e-6)


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown AFT constraint"):
        call([-1.0, -0.5], [True, False], [0, 0], "circle")
    with pytest.raises(ValueError, match="same shape"):
        aft_loss(torch.zeros(3), torch.tensor([True, False]), torch.zeros(3, dtype=torch.long), "dc", 0.5)
