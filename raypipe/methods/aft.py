"""AFT, alignment fine-tuning (Wang et al. 2023): one training row per question, holding its sampled chains.

A row pairs a question's distinct sampled chains (positives: right final answer) with one worked solution: in
our regime the pool questions have no reference chain, so L_VFT is taken on the worked set, one worked
solution per row (a seeded shuffle, cycled). Questions whose chains are all right or all wrong still contribute
their L_VFT term; the alignment loss skips them (raypipe.train.losses.aft_loss).

Ranking feedback (constraint 'rank') needs an order beyond right / wrong. On the synthetic task we rank wrong
chains by how far they got: the exact verifier's first wrong step (later is better). This is step-level oracle
feedback the other methods do not get; on real data a process reward model or Monte-Carlo values would supply it.
A task without an exact checker refuses 'rank' (raypipe.tasks.checks): every wrong chain would rank 0 there and
'rank' would silently be 'bc'.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from raypipe.methods.base import BuildInputs
from raypipe.methods.chains import answer_ids, distinct_by_question

POSITIVE_RANK = 1_000
"""Above any first-wrong-step index a wrong chain can have."""


def candidate_rank(sample: dict[str, Any]) -> int:
    """Positives above every negative; a negative ranks by its first wrong step when the task knows it."""
    if sample["correct"]:
        return POSITIVE_RANK
    return int(sample.get("exact_first_wrong") or 0)


def build(inputs: BuildInputs) -> list[dict[str, Any]]:
    cfg = inputs.cfg.aft
    if not inputs.worked:
        raise ValueError("AFT needs worked solutions for its L_VFT term, and the worked set is empty")
    order = list(range(len(inputs.worked)))
    random.Random(inputs.cfg.seed * 7919 + inputs.round).shuffle(order)
    rows = []
    for k, (qid, samples) in enumerate(sorted(distinct_by_question(inputs.graded).items())):
        chosen = samples[: cfg.max_candidates]
        worked = inputs.worked[order[k % len(order)]]
        cands = [answer_ids(s, inputs.eos_id) for s in chosen]
        rows.append({"qid": qid, "question": chosen[0]["question"],
                     "sft_ids": worked["input_ids"], "sft_mask": worked["loss_mask"],
                     "cand_ids": [c[0] for c in cands], "cand_mask": [c[1] for c in cands],
                     "cand_text": [s["completion"] for s in chosen],
                     "cand_positive": [bool(s["correct"]) for s in chosen],
                     "cand_rank": [candidate_rank(s) for s in chosen], **inputs.provenance})
    return rows


def assessment_rows(graded: Sequence[dict[str, Any]], eos_id: int) -> list[dict[str, Any]]:
    """One row per distinct chain of questions that have both a right and a wrong one: what the assessment
    accuracy is measured on."""
    rows = []
    for qid, samples in sorted(distinct_by_question(graded).items()):
        if len({bool(s["correct"]) for s in samples}) < 2:
            continue
        for s in samples:
            ids, mask = answer_ids(s, eos_id)
            rows.append({"qid": qid, "cand_ids": ids, "cand_mask": mask, "positive": bool(s["correct"])})
    return rows


def assessment_accuracy(qids: Sequence[int], positive: Sequence[bool],
                        scores: Sequence[float]) -> float | None:
    """AFT's assessment accuracy: the share of same-question (right, wrong) chain pairs in which the model gives
    the right chain the higher score (token-averaged log-likelihood). None when there is no such pair."""
    by_question: dict[int, tuple[list[float], list[float]]] = {}
    for qid, pos, score in zip(qids, positive, scores):
        by_question.setdefault(qid, ([], []))[0 if pos else 1].append(score)
    right = total = 0
    for pos_scores, neg_scores in by_question.values():
        for p in pos_scores:
            for n in neg_scores:
                right += p > n
                total += 1
    return right / total if total else None
