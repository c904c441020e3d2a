"""Whole-answer preference pairs for DPO (sigmoid) and IPO: a correct and a wrong sample of the same question."""

from __future__ import annotations

import random
from typing import Any

from raypipe.methods.base import BuildInputs
from raypipe.methods.chains import answer_ids, distinct_by_question


def build(inputs: BuildInputs) -> list[dict[str, Any]]:
    """Per question, each distinct wrong answer (up to `max_pairs_per_question`) against a distinct correct one,
    correct answers cycled in a seeded order so one lucky sample is not the chosen side of every pair."""
    section = inputs.cfg.ipo if inputs.cfg.method == "ipo" else inputs.cfg.dpo
    rng = random.Random(inputs.cfg.seed * 7919 + inputs.round)
    rows = []
    for qid, samples in distinct_by_question(inputs.graded).items():
        correct = [s for s in samples if s["correct"]]
        wrong = [s for s in samples if not s["correct"]]
        if not correct or not wrong:
            continue
        rng.shuffle(correct)
        for k, rejected in enumerate(wrong[: section.max_pairs_per_question]):
            chosen = correct[k % len(correct)]
            chosen_ids, chosen_mask = answer_ids(chosen, inputs.eos_id)
            rejected_ids, rejected_mask = answer_ids(rejected, inputs.eos_id)
            rows.append({"prompt": chosen["question"], "chosen": chosen["completion"],
                         "rejected": rejected["completion"], "answer": chosen["gold"],
                         "chosen_ids": chosen_ids, "chosen_mask": chosen_mask,
                         "rejected_ids": rejected_ids, "rejected_mask": rejected_mask,
                         "qid": qid, **inputs.provenance})
    return rows
