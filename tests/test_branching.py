"""The Monte-Carlo localiser against the exact step verifier, on wrong chains with a known first error."""

from __future__ import annotations

import math
import random

import pytest
from transformers import AutoTokenizer

from raypipe.config import BranchConfig
from raypipe.data.steps import step_token_ends
from raypipe.data.synthetic import ArithmeticProblem, answer_line, first_wrong_step, parse_question
from raypipe.grading import grade
from raypipe.rollout.branching import Brancher, WrongChain, branch_row, localisation_metrics
from raypipe.rollout.generation import EnginePool
from raypipe.rollout.sampling import grade_samples, prompt_rows, sample_chains
from raypipe.tasks import make_task

K = 6
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _plant_error(problem: ArithmeticProblem, k: int, rng: random.Random) -> str:
    """The true chain with step k's result off by 1-9; later steps compute correctly from the wrong value."""
    lines, value = [], None
    for i, step in enumerate(problem.steps, start=1):
        label, expression = step.split(": ")
        a, op, b = expression.split(" ")[:3]
        a = int(a) if value is None else value
        value = _APPLY[op](a, int(b)) + (rng.randint(1, 9) if i == k else 0)
        lines.append(f"{label}: {a} {op} {b} = {value}\n")
    return "".join(lines) + answer_line(value)


@pytest.fixture(scope="module")
def setup(e2e_run: dict):
    """The e2e run's SFT model behind a live engine, plus wrong chains whose first error we planted."""
    cfg = e2e_run["cfg"]
    model = str(cfg.run_dir / "round_0" / "sft" / "model")
    tok = AutoTokenizer.from_pretrained(model)
    pool = EnginePool(cfg.engine)
    task = make_task(cfg.task)
    records = dict(enumerate(task.splits.test[:40]))
    problems = [parse_question(p.question) for p in records.values()]
    samples = sample_chains(pool, model, prompt_rows(list(records.items()), tok, task), cfg.sampling, seed=0)
    siblings = grade_samples(samples, records, task)
    rng = random.Random(0)
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    chains = []
    for qid, problem in enumerate(problems):
        k = rng.randint(1, len(problem.steps))
        completion = _plant_error(problem, k, rng)
        assert first_wrong_step(problem, completion) == k
        prompt_ids = tok(problem.prompt, add_special_tokens=False).input_ids
        ids = tok(problem.prompt + completion, add_special_tokens=False).input_ids[len(prompt_ids):]
        mine = [r for r in siblings if r["qid"] == qid]
        chains.append(WrongChain(qid=qid, sample_idx=-1, question=problem.question, gold=str(problem.answer),
                                 prompt_ids=prompt_ids, completion_ids=ids, completion=completion,
                                 step_ends=step_token_ends([decode([t]) for t in ids]),
                                 sibling_successes=[r["completion_ids"] for r in mine if r["correct"]],
                                 num_siblings=len(mine), exact_first_wrong=k))
    yield cfg, pool, decode, chains
    pool.shutdown()


def _brancher(cfg, pool, decode, search: str) -> Brancher:
    return Brancher(BranchConfig(localiser="mc", search=search, rollouts=K), pool, pool.model_dir,
                    lambda text, gold: grade(text, gold, "synthetic").correct, decode,
                    cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens)


@pytest.mark.parametrize("search", ["binary", "linear"])
def test_mc_localiser_finds_the_planted_error(setup, search: str) -> None:
    cfg, pool, decode, chains = setup
    found = _brancher(cfg, pool, decode, search).localise(chains)
    rows = [branch_row(c, loc) for c, loc in zip(chains, found)]
    usable = [r for r in rows if r["first_wrong"] is not None]
    assert len(usable) >= len(chains) // 2, "the SFT model solves most questions at least once (MC_0 > 0)"
    assert localisation_metrics(rows, "mc", True)["mc_exact_agreement_localised"] >= 0.8
    for chain, loc in zip(chains, found):
        if loc.first_wrong is None:
            assert loc.mc[0] == 0 and loc.rollouts == 0
            continue
        assert loc.mc[loc.first_wrong] == 0 and loc.mc[loc.first_wrong - 1] > 0
        budget = math.ceil(math.log2(chain.num_steps)) if search == "binary" else chain.num_steps - 1
        assert loc.rollouts <= budget * K
        for success in loc.successes:  # rectification reuses rollouts that really reach the answer
            prefix = chain.completion_ids[: chain.step_ends[loc.first_wrong - 2] if loc.first_wrong > 1 else 0]
            assert grade(decode(prefix + success), chain.gold, "synthetic").correct


def test_exact_localiser_rectifies_from_the_last_good_prefix(setup) -> None:
    cfg, pool, decode, chains = setup
    brancher = Brancher(BranchConfig(localiser="exact", rectify_samples=K), pool, pool.model_dir,
                        lambda text, gold: grade(text, gold, "synthetic").correct, decode,
                        cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens)
    found = brancher.localise(chains)
    assert [loc.first_wrong for loc in found] == [c.exact_first_wrong for c in chains]
    assert sum(bool(loc.successes) for loc in found) >= len(chains) // 2
    assert all(loc.rollouts == (K if c.exact_first_wrong > 1 else 0) for c, loc in zip(chains, found))
