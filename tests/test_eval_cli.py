"""`raypipe eval` on a real benchmark file and on a file with bad rows: clear errors, nothing silently lost."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.cli import main
from raypipe.data.benchmarks import load_benchmark

from .conftest import SHARED_DATA


@pytest.fixture
def gsm8k_with_bad_rows(tmp_path: Path) -> Path:
    source = SHARED_DATA / "gsm8k" / "test.jsonl"
    if not source.is_file():
        pytest.skip(f"{source} not found (../shared/data is needed beside the repo)")
    good = source.read_text().splitlines()[:4]
    bad = ['{"question": "no answer field"}', "{not json", json.dumps({"question": "q", "answer": "no number"})]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([good[0], *bad, *good[1:]]) + "\n")
    return path


def test_bad_rows_are_reported_with_line_and_field_and_set_aside(gsm8k_with_bad_rows: Path) -> None:
    loaded = load_benchmark(gsm8k_with_bad_rows, "gsm8k")
    assert len(loaded.rows) == 4
    assert [(r["line"], r["field"]) for r in loaded.rejected] == [(2, "answer"), (3, "<row>"), (4, "answer")]
    assert all(r["file"] == str(gsm8k_with_bad_rows) and r["raw"] for r in loaded.rejected)


def test_eval_cli_grades_any_model_dir(gsm8k_with_bad_rows: Path, tiny_model_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(gsm8k_with_bad_rows), "--kind", "gsm8k",
                 "--limit", "3", "--backend", "hf", "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    assert "accuracy 0.0000 (0/3), 3 row(s) rejected" in capsys.readouterr().out  # an untrained model
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(predictions) == 3 and {"question", "gold", "completion", "correct"} <= predictions[0].keys()
    assert len((out / "rejected.jsonl").read_text().splitlines()) == 3


def test_eval_cli_user_mistakes_are_one_line_errors(tiny_model_dir: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "missing.jsonl"),
                 "--kind", "gsm8k"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--data", str(tmp_path / "x.jsonl"), "--kind", "math"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
