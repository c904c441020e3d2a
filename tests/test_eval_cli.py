"""`raypipe eval` on a real benchmark file and on a file with bad rows: clear errors, nothing silently lost."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.cli import main
from raypipe.data.benchmarks import load_benchmark

from .conftest import shared_data


@pytest.fixture
def gsm8k_with_bad_rows(tmp_path: Path) -> Path:
    source = shared_data("gsm8k", "test.jsonl")
    good = source.read_text().splitlines()[:4]
    bad = ['{"question": "no answer field"}', "{not json", json.dumps({"question": "q", "answer": "no number"})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good[0], *bad, *good[1:]]) + "\n")
    return path


def test_bad_rows_are_reported_with_line_and_field_and_set_aside(gsm8k_with_bad_rows: Path) -> None:
    loaded = load_benchmark(gsm8k_with_bad_rows, "gsm8k")
    assert len(loaded.rows) == 4
    assert [(r["row"], r["field"]) for r in loaded.rejected] == [(2, "answer"), (3, "<row>"), (4, "answer")]
    assert all(r["file"] == str(gsm8k_with_bad_rows) and r["raw"] for r in loaded.rejected)


def test_eval_cli_grades_any_model_dir(gsm8k_with_bad_rows: Path, tiny_model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Three usable rows of which the first is too long for the tiny model's 256-token context: it is set aside
    before generation with the bad rows, and the other two are graded."""
    data = tmp_path / "with_long.jsonl"
    question = "Start with 1. " + "Add 2. " * 200 + "What is the result?"
    long_row = json.dumps({"question": question, "answer": "#### 401"})
    data.write_text(long_row + "\n" + gsm8k_with_bad_rows.read_text())
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--kind", "gsm8k",
                 "--limit", "3", "--backend", "hf", "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    assert "accuracy 0.0000 (0/2), 4 row(s) rejected" in capsys.readouterr().out  # an untrained model
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(predictions) == 2 and {"question", "gold", "completion", "correct"} <= predictions[0].keys()
    assert [p["row"] for p in predictions] == [2, 6]  # the rows of the file they came from
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["row"], r["field"], r["reason"]) for r in rejected] == [
        (1, "question", "prompt_too_long"), (3, "answer", "missing_field"), (4, "<row>", "invalid_json"),
        (5, "answer", "no_final_answer")]
    assert re.fullmatch(r"prompt is \d+ tokens; the model context is 256 with max_new_tokens 8", rejected[0]["error"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["evaluated"], manifest["correct"], manifest["rejected"], manifest["context"]) == (2, 0, 4, 256)
    assert manifest["rejected_by_reason"] == {"prompt_too_long": 1, "missing_field": 1, "invalid_json": 1,
                                              "no_final_answer": 1}


def test_eval_cli_user_mistakes_are_one_line_errors(tiny_model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"),
                 "--kind", "gsm8k"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--kind", "math"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--kind", "gsm8k"]) == 2
    assert "--max-new-tokens 512 leaves no room for a question in the model's context of 256 tokens" in (
        capsys.readouterr().err)
