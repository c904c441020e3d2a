"""Step-DPO pair building from localised chains: schema, token ids, masks, the no-EOS rule, deduplication."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from raypipe.config import TaskConfig
from raypipe.data.steps import COT_PREFILL, step_token_ends
from raypipe.data.synthetic import first_wrong_step, generate_split
from raypipe.methods.stepdpo import build_pairs
from raypipe.rollout.branching import Localisation, WrongChain, branch_row, from_branch_row, localisation_metrics

SCHEMA = {"prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen", "full_rejected", "answer"}


def _chain(tok, problem, completion: str) -> WrongChain:
    prompt_ids = tok(problem.prompt, add_special_tokens=False).input_ids
    ids = tok(problem.prompt + completion, add_special_tokens=False).input_ids[len(prompt_ids):]
    return WrongChain(qid=0, sample_idx=1, question=problem.question, gold=str(problem.answer),
                      prompt_ids=prompt_ids, completion_ids=ids, completion=completion,
                      step_ends=step_token_ends([tok.decode([t]) for t in ids]), sibling_successes=[],
                      num_siblings=8, exact_first_wrong=first_wrong_step(problem, completion))


def test_pairs_have_the_schema_and_score_only_the_step(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problem = generate_split(TaskConfig(), "test", 1)[0]
    lines = problem.solution.splitlines(keepends=True)
    wrong_step = lines[1].replace(" = ", " = 1")  # step 2 has a wrong result
    chain = _chain(tok, problem, lines[0] + wrong_step + "The answer is 5.")
    assert chain.exact_first_wrong == 2
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    right = tok("".join(lines[1:]), add_special_tokens=False).input_ids
    loc = Localisation(first_wrong=2, mc={0: 0.5, 2: 0.0, 4: 0.0}, successes=[right, right], rollouts=8)
    step_ends = lambda ids: step_token_ends([decode([t]) for t in ids])  # noqa: E731
    rows = build_pairs([chain], [loc], decode, step_ends, max_pairs_per_wrong=2, provenance={"round": 1})
    assert len(rows) == 1, "identical successes give one pair"
    row = rows[0]
    assert SCHEMA <= row.keys()
    assert row["chosen"] == lines[1] and row["rejected"] == wrong_step
    assert row["initial_reason_steps"] == COT_PREFILL + lines[0]
    assert row["full_chosen"].endswith(problem.solution[len(lines[0]):])
    assert row["first_wrong_step"] == row["exact_first_wrong_step"] == 2 and row["round"] == 1
    for side in ("chosen", "rejected"):
        ids, mask = row[f"{side}_ids"], row[f"{side}_mask"]
        scored = [t for t, m in zip(ids, mask) if m]
        assert decode(scored) == row[side]
        assert tok.eos_token_id not in ids
        assert decode(ids[: mask.index(1)]) == problem.prompt + lines[0]


def test_branch_rows_round_trip_and_localisation_metrics(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problem = generate_split(TaskConfig(), "test", 1)[0]
    chain = _chain(tok, problem, "Step 1: 1 + 1 = 2\nThe answer is 2.")
    loc = Localisation(first_wrong=1, mc={0: 0.25, 2: 0.0}, successes=[[5, 6]], rollouts=0)
    back_chain, back_loc = from_branch_row(branch_row(chain, loc))
    assert back_chain.completion_ids == chain.completion_ids and back_loc == loc
    rows = [branch_row(chain, loc), branch_row(chain, Localisation(first_wrong=2)),
            branch_row(chain, Localisation(first_wrong=None))]
    metrics = localisation_metrics(rows, "mc", exact_checker=True)
    assert metrics["localised"] == 2 and metrics["localised_fraction"] == 2 / 3
    assert metrics["mc_exact_agreement"] == 1 / 3, "an unlocalised chain counts as a miss"
    assert metrics["mc_exact_agreement_localised"] == 1 / 2
    unchecked = localisation_metrics(rows, "mc", exact_checker=False)
    assert unchecked["mc_exact_agreement"] is None and "no exact" in unchecked["mc_exact_agreement_why"]
    assert unchecked["localised_fraction"] == 2 / 3
