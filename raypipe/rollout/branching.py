"""Step-level branching: locate the first wrong step of a wrong chain and find correct steps to replace it.

Localisers (METHODS.md section 1):
- `mc`: Monte-Carlo rollouts. For prefix P_i (question + steps 1..i) sample K continuations; MC_i is the share that
  reach the gold answer. The first wrong step is k with MC_k = 0 and MC_{k-1} > 0: found by binary search
  (invariant MC_lo > 0, MC_hi = 0; about log2(n) * K rollouts) or by a linear scan (n * K, the smallest such k).
- `exact`: the synthetic task's step verifier (known true steps); also the ground truth `mc` is measured against.
Rectification reuses what was already sampled: MC_0's rollouts are the chain's sibling samples, and the successful
rollouts from P_{k-1} are the correct continuations whose first steps become the chosen steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from raypipe.config import BranchConfig
from raypipe.engines.base import SamplingSpec, derive_seed
from raypipe.rollout.generation import EnginePool, generate_rows

Grader = Callable[[str, str], bool]
"""(completion text, gold answer) -> correct."""


@dataclass
class WrongChain:
    """A sampled chain with a wrong final answer, cut into steps at token boundaries."""

    qid: int
    sample_idx: int
    question: str
    gold: str
    prompt_ids: list[int]
    completion_ids: list[int]
    completion: str
    step_ends: list[int]
    """Exclusive token end of each step in completion_ids (see `raypipe.data.steps.step_token_ends`)."""
    sibling_successes: list[list[int]]
    """Completion ids of the question's correct samples: the free rollouts from P_0."""
    num_siblings: int
    exact_first_wrong: int | None = None

    @property
    def num_steps(self) -> int:
        return len(self.step_ends)

    def prefix_ids(self, i: int) -> list[int]:
        """Token ids of P_i: the prompt and the first i steps."""
        return self.prompt_ids + self.completion_ids[: self.step_ends[i - 1] if i else 0]

    def step_ids(self, k: int) -> list[int]:
        """Token ids of step k (1-based)."""
        return self.completion_ids[(self.step_ends[k - 2] if k > 1 else 0): self.step_ends[k - 1]]


@dataclass
class Localisation:
    """Where a chain first went wrong and the correct continuations from just before it."""

    first_wrong: int | None
    """1-based step index; None when the chain was skipped (MC_0 = 0, or no step with MC 0)."""
    mc: dict[int, float] = field(default_factory=dict)
    """MC value per probed prefix index (mc localiser)."""
    successes: list[list[int]] = field(default_factory=list)
    """Correct continuation ids sampled from P_{first_wrong - 1}."""
    rollouts: int = 0
    """Continuations this chain cost (sibling samples are free)."""


class Brancher:
    """Runs a localiser over many chains at once: each search level is one batched generation pass."""

    def __init__(self, cfg: BranchConfig, pool: EnginePool, model_dir: str, grader: Grader,
                 decode: Callable[[list[int]], str], temperature: float, top_p: float, max_tokens: int,
                 seed: int | None = None) -> None:
        self.cfg, self.pool, self.model_dir, self.grader, self.decode = cfg, pool, model_dir, grader, decode
        self.spec = SamplingSpec(n=cfg.rollouts, temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.seed = seed
        """Base seed: each generation pass (search level) draws from `derive_seed(seed, pass number)`."""
        self.passes = 0

    def localise(self, chains: Sequence[WrongChain]) -> list[Localisation]:
        if self.cfg.localiser == "exact":
            return self._exact(chains)
        return self._mc_binary(chains) if self.cfg.search == "binary" else self._mc_linear(chains)

    def _rollouts(self, probes: Sequence[tuple[WrongChain, int]], n: int) -> list[list[tuple[list[int], bool]]]:
        """n continuations of each probed prefix, each with whether it reaches the gold answer."""
        self.passes += 1
        spec = SamplingSpec(n=n, temperature=self.spec.temperature, top_p=self.spec.top_p,
                            max_tokens=self.spec.max_tokens,
                            seed=None if self.seed is None else derive_seed(self.seed, self.passes))
        rows = generate_rows(self.pool, self.model_dir, [{"prompt_ids": c.prefix_ids(i), "probe": j}
                                         for j, (c, i) in enumerate(probes)], spec)
        results: list[list[tuple[list[int], bool]]] = [[] for _ in probes]
        for row in rows:
            chain, i = probes[row["probe"]]
            prefix = chain.completion_ids[: chain.step_ends[i - 1] if i else 0]
            text = self.decode(prefix + row["completion_ids"])
            results[row["probe"]].append((row["completion_ids"], self.grader(text, chain.gold)))
        return results

    def _start(self, chains: Sequence[WrongChain]) -> list[Localisation]:
        """MC_0 from the sibling samples and MC_n = 0 (the chain itself is wrong): both free."""
        return [Localisation(first_wrong=None, mc={0: len(c.sibling_successes) / max(c.num_siblings, 1),
                                                   c.num_steps: 0.0}) for c in chains]

    def _mc_binary(self, chains: Sequence[WrongChain]) -> list[Localisation]:
        found = self._start(chains)
        bounds = {j: (0, c.num_steps) for j, c in enumerate(chains) if found[j].mc[0] > 0}
        successes = {j: chains[j].sibling_successes for j in bounds}
        while active := [j for j, (lo, hi) in bounds.items() if hi - lo > 1]:
            probes = [(chains[j], (bounds[j][0] + bounds[j][1]) // 2) for j in active]
            for j, (chain, mid), outcome in zip(active, probes, self._rollouts(probes, self.cfg.rollouts)):
                found[j].rollouts += len(outcome)
                wins = [ids for ids, ok in outcome if ok]
                found[j].mc[mid] = len(wins) / len(outcome)
                lo, hi = bounds[j]
                if wins:
                    bounds[j], successes[j] = (mid, hi), wins
                else:
                    bounds[j] = (lo, mid)
        for j, (lo, hi) in bounds.items():
            found[j].first_wrong, found[j].successes = hi, successes[j]
        return found

    def _mc_linear(self, chains: Sequence[WrongChain]) -> list[Localisation]:
        found = self._start(chains)
        probes = [(c, i) for j, c in enumerate(chains) if found[j].mc[0] > 0 for i in range(1, c.num_steps)]
        outcomes: dict[tuple[int, int], list[tuple[list[int], bool]]] = {}
        for (chain, i), outcome in zip(probes, self._rollouts(probes, self.cfg.rollouts)):
            outcomes[(id(chain), i)] = outcome
        for j, chain in enumerate(chains):
            if found[j].mc[0] == 0:
                continue
            wins_before = chain.sibling_successes
            for i in range(1, chain.num_steps + 1):
                outcome = outcomes.get((id(chain), i), [])
                wins = [ids for ids, ok in outcome if ok]
                if i < chain.num_steps:
                    found[j].rollouts += len(outcome)
                    found[j].mc[i] = len(wins) / len(outcome)
                if not wins and found[j].first_wrong is None:
                    found[j].first_wrong, found[j].successes = i, wins_before
                wins_before = wins
        return found

    def _exact(self, chains: Sequence[WrongChain]) -> list[Localisation]:
        found: list[Localisation] = []
        probes: list[tuple[WrongChain, int]] = []
        probed: list[int] = []
        for j, chain in enumerate(chains):
            k = chain.exact_first_wrong
            if k is None or k > chain.num_steps:
                found.append(Localisation(first_wrong=None))
                continue
            found.append(Localisation(first_wrong=k, successes=chain.sibling_successes if k == 1 else []))
            if k > 1:
                probes.append((chain, k - 1))
                probed.append(j)
        for j, outcome in zip(probed, self._rollouts(probes, self.cfg.rectify_samples)):
            found[j].rollouts += len(outcome)
            found[j].successes = [ids for ids, ok in outcome if ok]
        return found


def branch_row(chain: WrongChain, loc: Localisation) -> dict:
    """A chain and its localisation as one flat artefact row (what the build stage reads back)."""
    return {"qid": chain.qid, "sample_idx": chain.sample_idx, "question": chain.question, "gold": chain.gold,
            "prompt_ids": chain.prompt_ids, "completion_ids": chain.completion_ids,
            "completion": chain.completion, "step_ends": chain.step_ends,
            "exact_first_wrong": chain.exact_first_wrong, "first_wrong": loc.first_wrong,
            "mc_prefixes": sorted(loc.mc), "mc_values": [loc.mc[i] for i in sorted(loc.mc)],
            "successes": loc.successes, "rollouts": loc.rollouts}


def from_branch_row(row: dict) -> tuple[WrongChain, Localisation]:
    chain = WrongChain(qid=row["qid"], sample_idx=row["sample_idx"], question=row["question"], gold=row["gold"],
                       prompt_ids=row["prompt_ids"], completion_ids=row["completion_ids"],
                       completion=row["completion"], step_ends=row["step_ends"], sibling_successes=[],
                       num_siblings=0, exact_first_wrong=row["exact_first_wrong"])
    loc = Localisation(first_wrong=row["first_wrong"], mc=dict(zip(row["mc_prefixes"], row["mc_values"])),
                       successes=row["successes"], rollouts=row["rollouts"])
    return chain, loc


def localisation_metrics(rows: list[dict], localiser: str, exact_checker: bool) -> dict[str, Any]:
    """How much of the round's wrong chains the localiser placed, and how well.

    `localised_fraction`: localised chains / all wrong chains. Where the task has an exact checker and the
    localiser is not that checker, `mc_exact_agreement` is the share of ALL wrong chains (with an exact first
    wrong step) placed where the checker puts it (an unlocalised chain counts as a miss), and
    `mc_exact_agreement_localised` the share over the localised ones only; otherwise both are None, with
    `mc_exact_agreement_why`.
    """
    localised = [r for r in rows if r["first_wrong"] is not None]
    out: dict[str, Any] = {"localised": len(localised),
                           "localised_fraction": len(localised) / len(rows) if rows else None,
                           "mc_exact_agreement": None, "mc_exact_agreement_localised": None}
    if not exact_checker:
        return {**out, "mc_exact_agreement_why": "the task has no exact first-wrong-step checker"}
    if localiser == "exact":
        return {**out, "mc_exact_agreement_why": "the localiser is the exact checker"}
    checked = [r for r in rows if r["exact_first_wrong"] is not None]
    hits = sum(r["first_wrong"] == r["exact_first_wrong"] for r in checked)
    both = [r for r in checked if r["first_wrong"] is not None]
    return {**out, "mc_exact_agreement": hits / len(checked) if checked else None,
            "mc_exact_agreement_localised": hits / len(both) if both else None}
