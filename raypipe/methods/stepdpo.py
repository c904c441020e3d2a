"""Step-DPO's training set: (correct step, first wrong step) pairs after the same correct prefix.

Rows follow the public Math-Step-DPO-10K schema (`prompt`, `initial_reason_steps`, `chosen`, `rejected`,
`full_chosen`, `full_rejected`, `answer`) plus provenance and the token ids the trainer scores. One deviation,
forced by tokenisation: a step here is a whole line including its `Step k:` marker, so `initial_reason_steps` ends
at the newline before step k (cutting inside a line would change how the marker tokenises). No EOS is added to
chosen or rejected: a step does not end the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from raypipe.data.steps import COT_PREFILL
from raypipe.methods.base import BuildInputs
from raypipe.rollout.branching import Localisation, WrongChain, from_branch_row


def first_step_ids(ids: list[int], step_ends: Callable[[list[int]], list[int]]) -> list[int]:
    """The ids of the first step of a continuation (up to and including its delimiter)."""
    ends = step_ends(ids)
    return ids[: ends[0]] if ends else []


def build_pairs(chains: Sequence[WrongChain], localisations: Sequence[Localisation],
                decode: Callable[[list[int]], str], step_ends: Callable[[list[int]], list[int]],
                max_pairs_per_wrong: int, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per distinct correct first step found from P_{k-1}, against the chain's wrong step k."""
    rows: list[dict[str, Any]] = []
    for chain, loc in zip(chains, localisations):
        if loc.first_wrong is None or not loc.successes:
            continue
        k = loc.first_wrong
        prompt_ids = chain.prefix_ids(k - 1)
        prefix_text = decode(chain.completion_ids[: len(prompt_ids) - len(chain.prompt_ids)])
        rejected_ids = chain.step_ids(k)
        rejected = decode(rejected_ids)
        seen: set[str] = set()
        for success in loc.successes:
            chosen_ids = first_step_ids(success, step_ends)
            chosen = decode(chosen_ids)
            if not chosen_ids or chosen == rejected or chosen in seen:
                continue
            seen.add(chosen)
            rows.append({
                "prompt": chain.question,
                "initial_reason_steps": COT_PREFILL + prefix_text,
                "chosen": chosen,
                "rejected": rejected,
                "full_chosen": COT_PREFILL + prefix_text + decode(success),
                "full_rejected": COT_PREFILL + chain.completion,
                "answer": chain.gold,
                "chosen_ids": prompt_ids + chosen_ids,
                "chosen_mask": [0] * len(prompt_ids) + [1] * len(chosen_ids),
                "rejected_ids": prompt_ids + rejected_ids,
                "rejected_mask": [0] * len(prompt_ids) + [1] * len(rejected_ids),
                "qid": chain.qid,
                "sample_idx": chain.sample_idx,
                "first_wrong_step": k,
                "exact_first_wrong_step": chain.exact_first_wrong,
                "mc_prefixes": sorted(loc.mc),
                "mc_values": [loc.mc[i] for i in sorted(loc.mc)],
                **provenance,
            })
            if len(seen) >= max_pairs_per_wrong:
                break
    return rows


def build(inputs: BuildInputs) -> list[dict[str, Any]]:
    """Pairs from the branch stage's localised wrong chains."""
    if not inputs.branched:
        return []
    chains, locs = zip(*map(from_branch_row, inputs.branched))
    return build_pairs(chains, locs, inputs.decode, inputs.step_ends, inputs.cfg.branch.max_pairs_per_wrong,
                       inputs.provenance)
