"""RFT, rejection-sampling fine-tuning (Yuan et al. 2023): SFT on the worked solutions plus the policy's own
correct, deduplicated chains of the answer-only pool."""

from __future__ import annotations

from typing import Any

from raypipe.methods.base import BuildInputs
from raypipe.methods.chains import answer_ids, distinct_by_question


def build(inputs: BuildInputs) -> list[dict[str, Any]]:
    # every row has the same columns (Parquet takes its schema from the rows): worked rows have no question id
    rows = [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"], "source": "worked", "qid": None,
             **inputs.provenance} for r in inputs.worked]
    for samples in distinct_by_question(inputs.graded).values():
        for sample in [s for s in samples if s["correct"]][: inputs.cfg.rft.max_per_question]:
            ids, mask = answer_ids(sample, inputs.eos_id)
            rows.append({"input_ids": ids, "loss_mask": mask, "source": "self", "qid": sample["qid"],
                         **inputs.provenance})
    return rows
