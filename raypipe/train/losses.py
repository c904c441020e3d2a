"""Training objectives as pure functions of log-prob tensors and masks: no model, no data loading.

Conventions: `labels` are the input ids of a causal LM batch, (B, T); `loss_mask` (B, T) marks which label
tokens are scored (1) and which are context or padding (0). Logits at position t predict the token at t + 1, so
`loss_mask[:, 0]` is never used. Nothing is appended here: a row scores exactly the tokens its mask marks, which is
how Step-DPO scores a step without an end-of-sequence token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _upcast(logits: Tensor) -> Tensor:
    """bf16/fp16 logits are upcast to fp32 before log_softmax (precision); fp32/fp64 stay as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def token_logps(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-prob of each next token from full logits, (B, T-1): the plain path (raypipe.train.logprobs computes
    the same values chunk by chunk without the (B, T, V) log-softmax)."""
    logp = torch.log_softmax(_upcast(logits[:, :-1]), dim=-1)
    return torch.gather(logp, 2, labels[:, 1:].unsqueeze(-1)).squeeze(-1)


def sequence_logps(logps: Tensor, loss_mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, AFT's score) of the masked tokens' log-probs per row, (B,). `logps` (B, T-1) are the
    log-probs of labels[:, 1:] (`token_logps`). A row with no scored token gives 0."""
    mask = loss_mask[:, 1:].to(logps.dtype)
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sft_loss(logps: Tensor, loss_mask: Tensor, normaliser: float | None = None) -> Tensor:
    """Token-level mean negative log-likelihood over every scored token of the batch.

    `normaliser` replaces the batch's scored-token count: a micro-batch of a larger batch divides by the whole
    batch's count, so the micro-batches' losses (and gradients) add up to the whole batch's.
    """
    mask = loss_mask[:, 1:].to(logps.dtype)
    count = mask.sum().clamp(min=1) if normaliser is None else max(normaliser, 1)
    return -(logps * mask).sum() / count


def _log_ratios(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """Policy minus reference log-probs; the reference is a constant, so only the policy gets gradients."""
    return (policy_chosen_logps - ref_chosen_logps.detach(),
            policy_rejected_logps - ref_rejected_logps.detach())


def _mean(values: Tensor, normaliser: float | None) -> Tensor:
    """The mean, or the sum over `normaliser` (a micro-batch's share of a larger batch's mean)."""
    return values.mean() if normaliser is None else values.sum() / max(normaliser, 1)


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float,
             normaliser: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023): mean of -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).

    Returns (loss, chosen_rewards, rejected_rewards); the rewards are beta * log-ratio per pair, detached.
    `normaliser`: divide the sum by the whole batch's pair count instead (micro-batches).
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = _mean(-F.logsigmoid(beta * (chosen - rejected)), normaliser)
    return loss, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float,
             normaliser: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023): mean of (log-ratio difference - 1/(2 beta))^2, a bounded target margin.

    TRL feeds IPO token-averaged log-probs; this takes whatever the caller passes (sum or mean).
    `normaliser`: as in `dpo_loss`.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = _mean((chosen - rejected - 1 / (2 * beta)) ** 2, normaliser)
    return loss, beta * chosen.detach(), beta * rejected.detach()


AFT_CONSTRAINTS = ("dc", "bc", "rank", "none")
"""AFT's constraints: detached, boundary, ranking (boundary over every ordered pair), none (the unconstrained
alignment loss, for ablations only: it drives negative scores down without bound)."""


def aft_loss(scores: Tensor, is_positive: Tensor, group_ids: Tensor, constraint: str, beta: float,
             ranks: Tensor | None = None, normaliser: float | None = None) -> Tensor:
    """AFT's constrained alignment loss (Wang et al. 2023), the mean over groups that have something to rank.

    `scores` (N,) are token-averaged log-likelihoods of N candidates, `group_ids` (N,) says which question each
    belongs to, `is_positive` (N,) whether its final answer is right. Per group, with s_p positives, s_n negatives:

        dc:    log(1 + sum_p sum_n exp(sg[s_n] - s_p))                     only positives move
        bc:    log(1 + sum_p sum_n [exp(s_n - s_p) + exp(T_p - s_n)])      B = min_p sg[s_p] - beta,
                                                                           T_p = 2B - sg[s_p]
        rank:  bc over every ordered pair (i above j) of `ranks` (higher is better; default: is_positive),
               with the boundary of j set from the candidates ranked above it: B_j = min_{i above j} sg[s_i] - beta
        none:  log(1 + sum_p sum_n exp(s_n - s_p))

    For bc the stationary point of each negative is exactly B: above it the first term pushes it down, below it
    the second pushes it back up. Groups with no positive or no negative (no two rank levels for `rank`) give
    nothing; with no such group the loss is 0 (still attached to `scores`, so backward works). `normaliser`
    replaces the count of such groups (a micro-batch divides by the whole batch's count).
    """
    if constraint not in AFT_CONSTRAINTS:
        raise ValueError(f"unknown AFT constraint {constraint!r}; expected one of {AFT_CONSTRAINTS}")
    if not scores.shape == is_positive.shape == group_ids.shape:
        raise ValueError(f"scores {tuple(scores.shape)}, is_positive {tuple(is_positive.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must have the same shape")
    levels = (ranks if ranks is not None and constraint == "rank" else is_positive).to(scores.dtype)
    per_group = []
    for group in torch.unique(group_ids):
        member = group_ids == group
        s, level = scores[member], levels[member]
        above = level[:, None] > level[None, :]  # above[i, j]: candidate i is ranked above candidate j
        if not above.any():
            continue
        per_group.append(_group_alignment(s, above, constraint, beta))
    if not per_group:
        return scores.sum() * 0.0
    return _mean(torch.stack(per_group), normaliser)


def rankable(levels: list[int] | list[bool]) -> bool:
    """Whether a group's candidates have two distinct levels, so `aft_loss` has a term for it."""
    return len(set(levels)) > 1


def _group_alignment(s: Tensor, above: Tensor, constraint: str, beta: float) -> Tensor:
    """log(1 + sum of the group's terms) as a logsumexp with a zero logit (stable for large violations)."""
    i, j = above.nonzero(as_tuple=True)  # every (better, worse) pair; for dc/bc/none: (positive, negative)
    anchor = s.detach()
    worse = anchor[j] if constraint == "dc" else s[j]
    logits = [worse - s[i]]
    if constraint in ("bc", "rank"):
        inf = torch.full_like(anchor, torch.inf)
        boundary = torch.where(above, anchor[:, None], inf[:, None]).min(dim=0).values - beta  # B_j per candidate
        logits.append(2 * boundary[j] - anchor[i] - s[j])  # T_ij - s_j with T_ij = 2 B_j - sg[s_i]
    return torch.logsumexp(torch.cat([s.new_zeros(1), *logits]), dim=0)


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """The reward statistics TRL logs for preference training."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
    }
