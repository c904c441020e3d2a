"""The method comparison: its statistics, its config checks, and one small real comparison on the e2e checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raypipe.compare import (ArmConfig, CompareConfig, load_compare, markdown_table, mean_interval, run_compare,
                             summarise)
from raypipe.config import ConfigError
from raypipe.artifacts import read_rows
from raypipe.data.synthetic import load_splits

from tests.conftest import E2E_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]


def test_mean_interval_is_the_student_t_interval() -> None:
    out = mean_interval([0.5, 0.6, 0.7])
    # mean 0.6, sd 0.1, t(0.975, 2) = 4.302653 -> half width 0.248414
    assert out["mean"] == pytest.approx(0.6)
    assert out["high"] - out["mean"] == pytest.approx(4.302653 * 0.1 / 3 ** 0.5, rel=1e-6)
    assert out["low"] == pytest.approx(2 * 0.6 - out["high"])


@pytest.mark.parametrize(("final", "selection", "ablations"), [
    ("compare", "select", set()),
    ("compare_lema", "select_lema", {"lema.explanations=false"}),  # the hypothesis under test, not a setting
])
def test_final_comparisons_grade_only_what_dev_chose(final: str, selection: str, ablations: set[str]) -> None:
    """A final comparison on test differs from its selection on dev only in the split, takes each arm's and the
    control's settings from arms the selection tried, and adds nothing but named ablations."""
    test, dev = load_compare(ROOT / f"conf/{final}.yaml"), load_compare(ROOT / f"conf/{selection}.yaml")
    assert set(dev.base_overrides) - set(test.base_overrides) == {"eval.split=dev"}, "only the split differs"
    tried = {o for a in dev.arms.values() for o in a.overrides}
    assert set(test.base_overrides) - set(dev.base_overrides) <= tried, "the control's setting was tried on dev"
    dev_arms = {(a.method, tuple(a.overrides)) for a in dev.arms.values()}
    for arm in test.arms.values():
        chosen = tuple(o for o in arm.overrides if o not in ablations)
        assert (arm.method, chosen) in dev_arms, "test grades dev's choices"
    assert len(set(test.seeds)) >= 3 and set(dev.seeds) <= set(test.seeds)


def test_compare_config_errors_name_the_problem(tmp_path: Path) -> None:
    final = load_compare(ROOT / "conf/compare.yaml")
    assert set(final.arms) == {"stepdpo", "dpo", "aft"} and final.arms["stepdpo"].rounds == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("arms:\n  x: {method: nope}\n")
    with pytest.raises(ConfigError, match="arm 'x'.*method"):
        load_compare(bad, [f"base={ROOT / 'conf/quickstart.yaml'}"])
    for seeds in ("[0]", "[0, 0]"):
        bad.write_text(f"seeds: {seeds}\narms:\n  x: {{method: dpo}}\n")
        with pytest.raises(ConfigError, match="distinct"):
            load_compare(bad)
    bad.write_text("arms:\n  x: {method: dpo, overrides: [engine.backend=hf]}\n")
    with pytest.raises(ConfigError, match="base_overrides"):
        load_compare(bad)
    bad.write_text("arms:\n  x: {method: dpo, overrides: [eval.split=train]}\n")
    with pytest.raises(ConfigError, match=r"eval.split='train' is not one of \['dev', 'test'\]"):
        load_compare(bad, [f"base={ROOT / 'conf/quickstart.yaml'}"])
    bad.write_text("arms:\n  x: {method: dpo, overrides: [dpo.nope=1]}\n")
    with pytest.raises(ConfigError, match="dpo.nope"):
        load_compare(bad, [f"base={ROOT / 'conf/quickstart.yaml'}"])


def test_a_small_comparison_runs_end_to_end(e2e_run: dict, tmp_path: Path) -> None:
    """Two arms x two seeds from the e2e run's SFT checkpoint: shared samples and control, equal steps. (The
    other methods' training sets and objectives are tested in test_methods.py and test_objectives.py.)"""
    sft_model = e2e_run["cfg"].run_dir / "round_0" / "sft" / "model"
    cmp = CompareConfig(
        name="cmp", output_dir=str(tmp_path), base=str(ROOT / "conf/quickstart.yaml"), seeds=[0, 1], round_steps=4,
        base_overrides=[*E2E_OVERRIDES, f"model.path={sft_model}", "warmup.max_steps=0", "wandb.mode=disabled",
                        "eval.assessment_questions=0", "sampling.questions_per_round=32", "eval.split=dev"],
        arms={"aft-dc": ArmConfig(method="aft", overrides=["aft.constraint=dc"]),
              "aft-rank": ArmConfig(method="aft", overrides=["aft.constraint=rank"])})
    result = run_compare(cmp)
    root = tmp_path / "cmp"
    written = json.loads((root / "compare.json").read_text())
    assert written["rows"].keys() == result["rows"].keys() == {
        "start (SFT checkpoint)", "sft continued (control)", "aft-dc", "aft-rank"}
    assert (root / "compare.png").stat().st_size > 0 and "| aft-rank |" in (root / "compare.md").read_text()
    assert load_compare(root / "config.yaml") == cmp, "the resolved comparison is kept beside its results"
    for arm in ("aft-dc", "aft-rank"):
        row = result["rows"][arm]
        assert row["train_steps"] == 4 and len(row["accuracy"]["values"]) == 2
        # same problems: the mean paired difference is the difference of the two arms' mean accuracies
        paired, control = row["paired_vs_control"], result["rows"]["sft continued (control)"]["accuracy"]
        assert paired["mean"] == pytest.approx(row["accuracy"]["mean"] - control["mean"], abs=1e-9)
        assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1] and paired["n_problems"] == 100
        assert written["rows"][arm]["paired_vs_control"] == paired
    graded = {r["question"] for r in read_rows(Path(result["runs"][0]["rounds"][0]["evaluations"]["after"]))}
    assert graded == {p.question for p in load_splits(e2e_run["cfg"].task)["dev"]}, "eval.split=dev grades dev"
    for seed in (0, 1):  # the second arm trains on the first arm's samples, against the first arm's control
        reused = json.loads((root / f"seed_{seed}" / "aft-rank" / "summary.json").read_text())["stages_reused"]
        assert {"round_0/sft", "round_1/sample", "round_1/grade", "round_1/control"} <= set(reused)
    assert "round_1/sample" not in json.loads((root / "seed_1" / "aft-dc" / "summary.json").read_text())[
        "stages_reused"], "each seed samples anew"
    starts = {r["rounds"][0]["accuracy_before"] for r in result["runs"]}
    assert len(starts) == 1, "every arm and seed starts from the same checkpoint"
    assert markdown_table(result).count("\n") == 4 + len(result["rows"])
    assert written["split"] == "dev" and markdown_table(result).startswith("Greedy accuracy (dev split) after")


def test_summary_counts_the_shared_control_once_per_seed() -> None:
    def run(seed: int, arm: str, after: float, control: float) -> dict:
        return {"seed": seed, "arm": arm, "method": "dpo", "rounds": [{
            "accuracy_before": 0.5, "accuracy_after": after, "control_accuracy_after": control, "n_train_rows": 10,
            "train_steps": 4, "assessment_before": 0.6, "assessment_after": 0.7, "rollouts_per_pair": None,
            "stage_seconds": {"train": 1.0}}]}

    cmp = CompareConfig(seeds=[0, 1], round_steps=4,
                        arms={"a": ArmConfig(method="dpo"), "b": ArmConfig(method="dpo")})
    empty = run(0, "a", 0.5, 0.5)
    empty["rounds"][0]["train_steps"] = 0  # no pair: nothing trained, so its "control" is the start
    result = summarise([empty, run(0, "b", 0.62, 0.7), run(1, "a", 0.64, 0.8), run(1, "b", 0.66, 0.8)], cmp)
    assert result["rows"]["sft continued (control)"]["accuracy"]["values"] == [0.7, 0.8]
    assert result["rows"]["start (SFT checkpoint)"]["accuracy"]["n"] == 2
    assert result["rows"]["b"]["accuracy"]["values"] == [0.62, 0.66]
    assert result["rows"]["a"]["assessment_after"] == pytest.approx(0.7)
    no_control = summarise([run(0, "a", 0.6, None), run(1, "a", 0.7, None)], cmp)
    assert "sft continued (control)" not in no_control["rows"] and markdown_table(no_control)
