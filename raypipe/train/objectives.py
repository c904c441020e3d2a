"""Training objectives: what a row of each kind holds and how a micro-batch of rows becomes a loss.

The Ray Train loop (loop.py) is generic: it reads rows through `Objective.read`, calls `Objective.step` for the
loss and its statistics, and averages the statistics over a log interval with `Objective.summarise`. Each
objective is a small picklable dataclass, so it travels to the workers inside the `TrainJob`.

A batch may be split into micro-batches (gradient accumulation). `Objective.totals(batch)` counts what the
whole batch's loss averages over (scored tokens, pairs, rankable groups), and `step` divides each
micro-batch's sums by those counts, so the micro-batches' losses, gradients and scalar statistics add up to
the whole batch's.

    sft          input_ids, loss_mask                                    token-mean NLL
    preference   chosen_/rejected_ ids and masks, ref_*_logps            sigmoid DPO or IPO (+ optional NLL)
    aft          sft_ids/sft_mask + candidates (ids, masks, positive,    L_VFT + weight * L_CA
                 rank) of one question
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from raypipe.train.collate import pad_sequences, truncate_left
from raypipe.train.losses import (AFT_CONSTRAINTS, aft_loss, dpo_loss, ipo_loss, preference_metrics, rankable,
                                  sequence_logps, sft_loss)

Row = tuple
Stats = dict[str, Tensor]
"""Per-micro-batch statistics: detached scalars (summed over a step's micro-batches, averaged over the
interval) or vectors (concatenated)."""
Totals = dict[str, int]
"""What a whole batch's loss terms average over (`Objective.totals`)."""

PREFERENCE_LOSSES = ("sigmoid", "ipo")


def _forward(engine: Any, seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]],
             pad_id: int, **kwargs: Any) -> tuple[Tensor, Tensor]:
    """One padded forward pass of a `TokenLogProbs` (or the engine wrapping one): (token log-probs (B, T-1),
    loss_mask (B, T)) on its device. `kwargs` go to `TokenLogProbs.forward`."""
    ids, attn, mask = pad_sequences(seqs, masks, pad_id)
    ids, attn, mask = ids.to(engine.device), attn.to(engine.device), mask.to(engine.device)
    return engine(input_ids=ids, attention_mask=attn, loss_mask=mask, **kwargs), mask


def _scored(mask: Sequence[int]) -> int:
    """Tokens a row's loss scores (position 0 predicts nothing)."""
    return sum(mask[1:])


@dataclass
class SFTObjective:
    """Token-level NLL on the masked tokens (SFT, the control, RFT)."""

    name: ClassVar[str] = "sft"

    def read(self, row: dict[str, Any], max_length: int) -> Row:
        return truncate_left(row["input_ids"], row["loss_mask"], max_length)

    def tokens(self, row: Row) -> int:
        return len(row[0])

    def totals(self, batch: list[Row]) -> Totals:
        return {"tokens": sum(_scored(r[1]) for r in batch)}

    def step(self, engine: Any, batch: list[Row], pad_id: int,
             totals: Totals | None = None) -> tuple[Tensor, Stats]:
        """The loss of `batch`, a micro-batch of the batch `totals` counts (default: `batch` itself)."""
        totals = self.totals(batch) if totals is None else totals
        logps, mask = _forward(engine, [r[0] for r in batch], [r[1] for r in batch], pad_id)
        return sft_loss(logps, mask, totals["tokens"]), {}

    def summarise(self, stats: dict[str, list[Tensor]]) -> dict[str, float]:
        return {}


@dataclass
class PreferenceObjective:
    """DPO-family loss on (chosen, rejected) rows against precomputed reference log-probs.

    Chosen and rejected share one forward pass (with `train.share_prefix`, their common prefix is run once).
    Sigmoid DPO scores summed log-probs (Step-DPO's rule); IPO scores token-averaged ones, as TRL does, so its
    target margin 1/(2 beta) does not grow with the answer's length.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    nll_weight: float = 0.0
    """Weight of an NLL term on the chosen tokens (RPO-style); 0 is the pure preference loss."""

    name: ClassVar[str] = "preference"

    def __post_init__(self) -> None:
        if self.loss_type not in PREFERENCE_LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r} is not one of {PREFERENCE_LOSSES}")

    def read(self, row: dict[str, Any], max_length: int) -> Row:
        return (*truncate_left(row["chosen_ids"], row["chosen_mask"], max_length),
                *truncate_left(row["rejected_ids"], row["rejected_mask"], max_length),
                float(row["ref_chosen_logps"]), float(row["ref_rejected_logps"]))

    def tokens(self, row: Row) -> int:
        return len(row[0]) + len(row[2])

    def totals(self, batch: list[Row]) -> Totals:
        return {"pairs": len(batch), "chosen_tokens": sum(_scored(r[1]) for r in batch)}

    def step(self, engine: Any, batch: list[Row], pad_id: int,
             totals: Totals | None = None) -> tuple[Tensor, Stats]:
        """The loss of `batch`, a micro-batch of the batch `totals` counts (default: `batch` itself)."""
        totals = self.totals(batch) if totals is None else totals
        n = len(batch)
        token_logps, mask = _forward(engine, [r[0] for r in batch] + [r[2] for r in batch],
                                     [r[1] for r in batch] + [r[3] for r in batch], pad_id, pairs=True)
        logps = sequence_logps(token_logps, mask)
        ref = torch.tensor([[r[4], r[5]] for r in batch], dtype=logps.dtype, device=logps.device)
        if self.loss_type == "ipo":
            counts = mask[:, 1:].sum(-1).clamp(min=1).to(logps.dtype)
            logps, ref = logps / counts, ref / torch.stack([counts[:n], counts[n:]], dim=1)
            loss, chosen, rejected = ipo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], self.beta,
                                              totals["pairs"])
        else:
            loss, chosen, rejected = dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], self.beta,
                                              totals["pairs"])
        if self.nll_weight > 0:
            loss = loss + self.nll_weight * sft_loss(token_logps[:n], mask[:n], totals["chosen_tokens"])
        return loss, {"chosen": chosen.detach(), "rejected": rejected.detach()}

    def summarise(self, stats: dict[str, list[Tensor]]) -> dict[str, float]:
        return preference_metrics(torch.cat(stats["chosen"]), torch.cat(stats["rejected"]))


@dataclass
class AFTObjective:
    """AFT: NLL on each row's reference chain (L_VFT) plus `weight` times the constrained alignment loss over
    the row's candidates, scored by their token-averaged log-likelihood (no reference model)."""

    constraint: str = "bc"
    beta: float = 0.5
    """Boundary margin of bc / rank, in average-log-prob units."""
    weight: float = 1.0
    """lambda in L_VFT + lambda * L_CA."""
    mle_on_positives: bool = False
    """Also put NLL on the positive candidates (RFT + alignment)."""

    name: ClassVar[str] = "aft"

    def __post_init__(self) -> None:
        if self.constraint not in AFT_CONSTRAINTS:
            raise ValueError(f"constraint={self.constraint!r} is not one of {AFT_CONSTRAINTS}")

    def read(self, row: dict[str, Any], max_length: int) -> Row:
        candidates = [truncate_left(i, m, max_length) for i, m in zip(row["cand_ids"], row["cand_mask"])]
        return (*truncate_left(row["sft_ids"], row["sft_mask"], max_length), candidates,
                [bool(p) for p in row["cand_positive"]], [int(k) for k in row["cand_rank"]])

    def tokens(self, row: Row) -> int:
        return len(row[0]) + sum(len(c[0]) for c in row[2])

    def totals(self, batch: list[Row]) -> Totals:
        """NLL tokens (L_VFT's chains, and the positives' with `mle_on_positives`), groups the constraint can
        rank, groups with a positive and a negative (the unconstrained loss's), and (positive, negative)
        pairs."""
        nll = sum(_scored(r[1]) for r in batch)
        if self.mle_on_positives:
            nll += sum(_scored(c[1]) for r in batch for c, p in zip(r[2], r[3]) if p)
        return {"nll_tokens": nll,
                "groups": sum(rankable(r[4] if self.constraint == "rank" else r[3]) for r in batch),
                "mixed_groups": sum(rankable(r[3]) for r in batch),
                "pairs": sum(sum(r[3]) * (len(r[3]) - sum(r[3])) for r in batch)}

    def step(self, engine: Any, batch: list[Row], pad_id: int,
             totals: Totals | None = None) -> tuple[Tensor, Stats]:
        """The loss of `batch`, a micro-batch of the batch `totals` counts (default: `batch` itself)."""
        totals = self.totals(batch) if totals is None else totals
        cands = [(c, pos, rank, g) for g, r in enumerate(batch) for c, pos, rank in zip(r[2], r[3], r[4])]
        seqs = [r[0] for r in batch] + [c[0] for c, *_ in cands]
        masks = [r[1] for r in batch] + [c[1] for c, *_ in cands]
        logps, mask = _forward(engine, seqs, masks, pad_id)
        n = len(batch)
        device = logps.device
        positive = torch.tensor([pos for _, pos, _, _ in cands], dtype=torch.bool, device=device)
        ranks = torch.tensor([rank for _, _, rank, _ in cands], dtype=torch.long, device=device)
        groups = torch.tensor([g for *_, g in cands], dtype=torch.long, device=device)
        scores = sequence_logps(logps[n:], mask[n:], average=True)
        nll_rows = torch.cat([torch.ones(n, dtype=torch.bool, device=device),
                              positive if self.mle_on_positives else torch.zeros_like(positive)])
        vft = sft_loss(logps[nll_rows], mask[nll_rows], totals["nll_tokens"])
        alignment = aft_loss(scores, positive, groups, self.constraint, self.beta, ranks, totals["groups"])
        unconstrained = aft_loss(scores.detach(), positive, groups, "none", self.beta,
                                 normaliser=totals["mixed_groups"])
        accuracy, margin = _pair_statistics(scores.detach(), positive, groups, totals["pairs"])
        stats = {"aft/vft": vft.detach(), "aft/alignment": unconstrained, "aft/constrained": alignment.detach(),
                 "aft/pair_accuracy": accuracy, "aft/pair_margin": margin}
        return vft + self.weight * alignment, stats

    def summarise(self, stats: dict[str, list[Tensor]]) -> dict[str, float]:
        return {k: torch.stack(v).mean().item() for k, v in stats.items() if v}


def _pair_statistics(scores: Tensor, positive: Tensor, groups: Tensor, total: int) -> tuple[Tensor, Tensor]:
    """Over same-question (positive, negative) pairs: the share where the positive scores higher (AFT's
    assessment accuracy) and the mean score margin, both divided by the batch's `total` pair count. Both 0
    when the batch has no such pair (never NaN: every rank must report the same keys with finite values for
    the all-reduce)."""
    pairs = (groups[:, None] == groups[None, :]) & positive[:, None] & ~positive[None, :]
    count = max(total, 1)
    gap = scores[:, None] - scores[None, :]
    return (pairs & (gap > 0)).sum() / count, (gap * pairs).sum() / count


Objective = SFTObjective | PreferenceObjective | AFTObjective
