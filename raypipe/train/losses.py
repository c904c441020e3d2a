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
    """Log-prob of each next token, (B, T-1). log_softmax + gather: fine for small vocabularies; large ones
    (150k) would want a chunked logsumexp to avoid a second (B, T, V) tensor."""
    logp = torch.log_softmax(_upcast(logits[:, :-1]), dim=-1)
    return torch.gather(logp, 2, labels[:, 1:].unsqueeze(-1)).squeeze(-1)


def sequence_logps(logits: Tensor, labels: Tensor, loss_mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, AFT's score) of the masked tokens' log-probs per row, (B,). A row with no scored token gives 0."""
    logps = token_logps(logits, labels)
    mask = loss_mask[:, 1:].to(logps.dtype)
    total = (logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sft_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Token-level mean negative log-likelihood over every scored token of the batch."""
    shifted = _upcast(logits[:, :-1])
    mask = loss_mask[:, 1:].to(shifted.dtype)
    nll = F.cross_entropy(shifted.transpose(1, 2), labels[:, 1:], reduction="none")
    return (nll * mask).sum() / mask.sum().clamp(min=1)


def _log_ratios(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                ref_rejected_logps: Tensor) -> tuple[Tensor, Tensor]:
    """Policy minus reference log-probs; the reference is a constant, so only the policy gets gradients."""
    return (policy_chosen_logps - ref_chosen_logps.detach(),
            policy_rejected_logps - ref_rejected_logps.detach())


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023): mean of -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)).

    Returns (loss, chosen_rewards, rejected_rewards); the rewards are beta * log-ratio per pair, detached.
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """IPO (Azar et al. 2023): mean of (log-ratio difference - 1/(2 beta))^2, a bounded target margin.

    TRL feeds IPO token-averaged log-probs; this takes whatever the caller passes (sum or mean).
    """
    chosen, rejected = _log_ratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = ((chosen - rejected - 1 / (2 * beta)) ** 2).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """The reward statistics TRL logs for preference training."""
    return {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracy": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margin": (chosen_rewards - rejected_rewards).mean().item(),
    }
