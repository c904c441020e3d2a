"""Every row a stage leaves out is counted by reason in its manifest and written to its rejected.jsonl: test
questions too long for the context (evaluate), LEMA corrections longer than lema.max_length (build). The stages
run on the tiny model without Ray: nothing here reaches an engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from raypipe.artifacts import StageResult, write_rows
from raypipe.config import RunConfig
from raypipe.data.synthetic import ArithmeticProblem
from raypipe.lema.exact import exact_correction
from raypipe.lema.format import numbered_steps
from raypipe.pipeline import Pipeline
from raypipe.task_config import TaskConfig

PROBLEM = ArithmeticProblem("Start with 23. Add 45. Subtract 17. What is the result?",
                            ("Step 1: 23 + 45 = 68", "Step 2: 68 - 17 = 51"), 51)


def _pipeline(tmp_path: Path, **changes: Any) -> tuple[Pipeline, StageResult]:
    cfg = RunConfig(output_dir=str(tmp_path), task=TaskConfig(sft_problems=20, pool_questions=10, dev_problems=5,
                                                                test_problems=6), **changes)
    pipeline = Pipeline(cfg)
    pipeline.init_stage = pipeline.init()
    return pipeline, pipeline.init_stage


def _rejected(stage: StageResult) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (stage.dir / "rejected.jsonl").read_text().splitlines()]


def test_test_questions_too_long_for_the_context_are_counted_and_written(tmp_path: Path) -> None:
    pipeline, init = _pipeline(tmp_path)
    pipeline.cfg.engine.max_model_len = pipeline.cfg.eval.max_new_tokens  # no room left for any question
    stage = pipeline.evaluate(0, "evaluate", init)
    assert stage.metrics["n"] == 0 and stage.metrics["rejected"] == 6
    assert stage.metrics["rejected_by_reason"] == {"prompt_too_long": 6}
    rejected = _rejected(stage)
    assert [r["qid"] for r in rejected] == list(range(6)) and {r["field"] for r in rejected} == {"question"}
    assert rejected[0]["raw"] == pipeline.splits.test[0].question


def test_lema_corrections_longer_than_max_length_are_counted_and_written(tmp_path: Path) -> None:
    pipeline, init = _pipeline(tmp_path, method="lema")
    pipeline.cfg.lema.max_length = 64  # the correction of a 2-step chain is longer
    wrong = "Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 41\nThe answer is 41."
    correction = exact_correction(PROBLEM, wrong)
    kept = {"qid": 3, "question": PROBLEM.question, "source": "policy", "status": "kept",
            "steps": numbered_steps(wrong), "incorrect_step": correction.incorrect_step,
            "explanation": correction.explanation, "corrected": list(correction.corrected)}
    corrected = pipeline.store.run(1, "correct", None, [], lambda out: {"rows": write_rows(
        out, [kept, {**kept, "qid": 4, "status": "wrong_final_answer"}])})
    worked = pipeline.sft_data(init)
    built = pipeline.build(1, worked, None, corrected, init)
    assert built.metrics["rows"] == 20, "the worked solutions only"
    assert built.metrics["rejected_by_reason"] == {"too_long": 1}
    (record,) = _rejected(built)
    assert (record["qid"], record["source"]) == (3, "policy") and "lema.max_length=64" in record["error"]
