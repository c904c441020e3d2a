"""The training methods, one module each: how a round's data becomes a training set, and what is minimised.

    method    samples  branches  reference  objective                 settings
    sft       no       no        no         NLL on worked solutions   sft
    rft       yes      no        no         NLL, + own correct chains rft
    dpo       yes      no        yes        sigmoid DPO, whole answers dpo
    ipo       yes      no        yes        IPO, whole answers        ipo
    stepdpo   yes      yes       yes        sigmoid DPO, single steps stepdpo
    aft       yes      no        no         L_VFT + lambda * L_CA     aft
    lema      yes      no        no         NLL, CoT + corrections    lema   (corrects its mistakes first)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from raypipe.config import RunConfig
from raypipe.update_config import UpdateConfig
from raypipe.methods import aft, dpo, lema, rft, sft, stepdpo
from raypipe.methods.base import BuildInputs
from raypipe.train.objectives import AFTObjective, Objective, PreferenceObjective, SFTObjective


@dataclass(frozen=True)
class Method:
    name: str
    samples: bool
    """Samples chains from the answer-only pool each round."""
    branches: bool
    """Runs step-level branching on the wrong chains."""
    reference: bool
    """Needs pi_ref log-probs (precomputed once per round)."""
    build: Callable[[BuildInputs], list[dict[str, Any]]]
    settings: Callable[[RunConfig], UpdateConfig]
    objective: Callable[[RunConfig], Objective]
    corrects: bool = False
    """Has its wrong chains corrected (LEMA's correct stage) before building."""
    uses_worked: bool = False
    """Trains on the worked solutions too (its training set mixes them in, or they are all of it)."""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sft", samples=False, branches=False, reference=False, build=sft.build,
           settings=lambda c: c.sft, objective=lambda c: SFTObjective(), uses_worked=True),
    Method("rft", samples=True, branches=False, reference=False, build=rft.build,
           settings=lambda c: c.rft, objective=lambda c: SFTObjective(), uses_worked=True),
    Method("dpo", samples=True, branches=False, reference=True, build=dpo.build, settings=lambda c: c.dpo,
           objective=lambda c: PreferenceObjective("sigmoid", c.dpo.beta, c.dpo.nll_weight)),
    Method("ipo", samples=True, branches=False, reference=True, build=dpo.build, settings=lambda c: c.ipo,
           objective=lambda c: PreferenceObjective("ipo", c.ipo.beta, c.ipo.nll_weight)),
    Method("stepdpo", samples=True, branches=True, reference=True, build=stepdpo.build,
           settings=lambda c: c.stepdpo,
           objective=lambda c: PreferenceObjective("sigmoid", c.stepdpo.beta, c.stepdpo.nll_weight)),
    Method("aft", samples=True, branches=False, reference=False, build=aft.build, settings=lambda c: c.aft,
           objective=lambda c: AFTObjective(c.aft.constraint, c.aft.beta, c.aft.weight, c.aft.mle_on_positives),
           uses_worked=True),
    Method("lema", samples=True, branches=False, reference=False, build=lema.build, settings=lambda c: c.lema,
           objective=lambda c: SFTObjective(), corrects=True, uses_worked=True),
)}

__all__ = ["METHODS", "BuildInputs", "Method"]
