"""What each method builds from a round's graded samples (pure functions, no Ray)."""

from __future__ import annotations

import pytest

from raypipe.config import RunConfig
from raypipe.methods import METHODS, BuildInputs
from raypipe.methods.aft import POSITIVE_RANK, assessment_accuracy, assessment_rows
from raypipe.methods.chains import answer_ids, distinct_by_question
from raypipe.train.objectives import AFTObjective, PreferenceObjective, SFTObjective

EOS = 99
WORKED = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [0, 1]}]


def sample(qid: int, idx: int, text: str, correct: bool, finish: str = "eos", first_wrong: int | None = None) -> dict:
    ids = [10 + ord(c) % 50 for c in text]
    return {"qid": qid, "sample_idx": idx, "question": f"q{qid}", "gold": "7", "prompt_ids": [7, 8],
            "completion_ids": ids, "completion": text, "finish_reason": finish, "correct": correct,
            "exact_first_wrong": None if correct else first_wrong}


GRADED = [
    sample(0, 0, "right a", True), sample(0, 1, "right a", True), sample(0, 2, "right b", True),
    sample(0, 3, "wrong a", False, first_wrong=2), sample(0, 4, "wrong b", False, "length", first_wrong=1),
    sample(1, 0, "only right", True), sample(1, 1, "only right 2", True),
    sample(2, 0, "only wrong", False, first_wrong=1),
]


def inputs(method: str, **overrides) -> BuildInputs:
    cfg = RunConfig(method=method)
    for key, value in overrides.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    return BuildInputs(cfg=cfg, round=1, worked=WORKED, graded=GRADED, eos_id=EOS,
                       provenance={"round": 1, "method": method})


def test_answer_ids_add_eos_only_when_the_policy_ended_there() -> None:
    ids, mask = answer_ids(GRADED[0], EOS)
    assert ids[:2] == [7, 8] and ids[-1] == EOS and mask == [0, 0] + [1] * (len(ids) - 2)
    cut, _ = answer_ids(GRADED[4], EOS)
    assert cut[-1] != EOS, "a chain cut by max_tokens did not end"


def test_distinct_by_question_drops_duplicate_completions() -> None:
    groups = distinct_by_question(GRADED)
    assert [s["completion"] for s in groups[0]] == ["right a", "right b", "wrong a", "wrong b"]


def test_sft_method_trains_on_the_worked_set_only() -> None:
    rows = METHODS["sft"].build(inputs("sft"))
    assert [r["input_ids"] for r in rows] == [w["input_ids"] for w in WORKED]


def test_rft_adds_distinct_correct_chains_capped_per_question() -> None:
    rows = METHODS["rft"].build(inputs("rft", **{"rft.max_per_question": 1}))
    own = [r for r in rows if r["source"] == "self"]
    assert len(rows) == len(WORKED) + 2 and [r["qid"] for r in own] == [0, 1]
    assert all(r["input_ids"][-1] == EOS and r["round"] == 1 for r in own)
    assert len(METHODS["rft"].build(inputs("rft"))) == len(WORKED) + 4


def test_rft_rows_keep_their_provenance_on_disk(tmp_path) -> None:
    from raypipe.artifacts import read_rows, write_rows

    write_rows(tmp_path, METHODS["rft"].build(inputs("rft")))
    own = [r for r in read_rows(tmp_path) if r["source"] == "self"]
    assert own and all(r["qid"] is not None and r["round"] == 1 and r["method"] == "rft" for r in own)


@pytest.mark.parametrize("method", ["dpo", "ipo"])
def test_whole_answer_pairs_need_a_right_and_a_wrong_answer(method: str) -> None:
    rows = METHODS[method].build(inputs(method))
    assert {r["qid"] for r in rows} == {0}, "questions 1 (all right) and 2 (all wrong) give no pair"
    assert [r["rejected"] for r in rows] == ["wrong a", "wrong b"]
    assert all(r["chosen"].startswith("right") for r in rows)
    assert rows[0]["rejected_ids"][-1] == EOS and rows[1]["rejected_ids"][-1] != EOS
    assert all(len(r["chosen_ids"]) == len(r["chosen_mask"]) for r in rows)
    capped = METHODS[method].build(inputs(method, **{f"{method}.max_pairs_per_question": 1}))
    assert len(capped) == 1


def test_aft_rows_hold_every_question_with_ranks_and_a_worked_solution() -> None:
    rows = METHODS["aft"].build(inputs("aft"))
    assert [r["qid"] for r in rows] == [0, 1, 2], "one-sided questions still train L_VFT"
    first = rows[0]
    assert first["cand_positive"] == [True, True, False, False]
    assert first["cand_rank"] == [POSITIVE_RANK, POSITIVE_RANK, 2, 1], "negatives rank by how far they got"
    assert all(r["sft_ids"] in [w["input_ids"] for w in WORKED] for r in rows)
    assert len(first["cand_ids"]) == len(first["cand_mask"]) == 4
    assert len(METHODS["aft"].build(inputs("aft", **{"aft.max_candidates": 2}))[0]["cand_ids"]) == 2


def test_aft_needs_worked_solutions() -> None:
    empty = inputs("aft")
    empty.worked = []
    with pytest.raises(ValueError, match="worked"):
        METHODS["aft"].build(empty)


def test_assessment_rows_and_accuracy() -> None:
    rows = assessment_rows(GRADED, EOS)
    assert {r["qid"] for r in rows} == {0} and len(rows) == 4
    # question 0: right chains score -1 and -3, wrong ones -2 and -4: 3 of 4 pairs in the right order
    assert assessment_accuracy([0, 0, 0, 0, 1], [True, True, False, False, True],
                               [-1.0, -3.0, -2.0, -4.0, 0.0]) == pytest.approx(0.75)
    assert assessment_accuracy([0, 1], [True, False], [0.0, 1.0]) is None, "no same-question pair"


def test_registry_maps_methods_to_their_settings_and_objectives() -> None:
    cfg = RunConfig()
    assert isinstance(METHODS["sft"].objective(cfg), SFTObjective) and METHODS["sft"].settings(cfg) is cfg.sft
    assert METHODS["ipo"].objective(cfg) == PreferenceObjective("ipo", cfg.ipo.beta, 0.0)
    assert METHODS["stepdpo"].branches and METHODS["stepdpo"].reference
    assert isinstance(METHODS["aft"].objective(cfg), AFTObjective) and not METHODS["aft"].reference
    assert not METHODS["sft"].samples
