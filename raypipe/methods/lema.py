"""LEMA (An et al. 2023): fine-tune on CoT data mixed with corrections of mistakes; the loss covers outputs only.

CoT examples are the worked solutions (prompt -> solution). A correction example's input is the instruction, the
question and the wrong solution, ending `Incorrect Step:`; its output is the three fields (+ EOS). Only
corrections whose final answer is right reach this stage (raypipe/lema/correct.py).
"""

from __future__ import annotations

import logging
from typing import Any

from raypipe.lema.format import Correction, correction_input
from raypipe.methods.base import BuildInputs

log = logging.getLogger(__name__)


def build(inputs: BuildInputs) -> list[dict[str, Any]]:
    max_length = inputs.cfg.lema.max_length
    rows = [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"], "source": "cot", "qid": None,
             **inputs.provenance} for r in inputs.worked]
    for c in inputs.corrections:
        if c["status"] != "kept":
            continue
        prompt = inputs.encode(correction_input(c["question"], c["steps"]))
        correction = Correction(c["incorrect_step"], c["explanation"], tuple(c["corrected"]))
        output = inputs.encode(correction.text(explanation=inputs.cfg.lema.explanations))
        output.append(inputs.eos_id)
        if len(prompt) + len(output) > max_length:  # cutting the input would cut the wrong solution: set it aside
            inputs.set_aside.append({"qid": c["qid"], "source": c["source"], "reason": "too_long", "error": (
                f"{len(prompt) + len(output)} tokens, more than lema.max_length={max_length}")})
            continue
        rows.append({"input_ids": prompt + output, "loss_mask": [0] * len(prompt) + [1] * len(output),
                     "source": f"correction:{c['source']}", "qid": c["qid"], **inputs.provenance})
    if inputs.set_aside:
        log.warning("lema: %d corrections are longer than lema.max_length=%d tokens and were set aside",
                    len(inputs.set_aside), max_length)
    return rows
