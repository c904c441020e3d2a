"""Bad input in every form issue 6 lists, through both loaders and the model-call paths: each bad row is set aside
with its file, row, field and a reason code the manifests count; a user mistake is a one-line error, never a trace."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from raypipe.config import ConfigError, load_config
from raypipe.data.benchmarks import DataError, load_benchmark
from raypipe.data.pairs import load_pairs
from raypipe.engines.base import Completion, Generator, SamplingSpec
from raypipe.engines.checks import context_length, key_from_env
from raypipe.engines.text import LocalTextGenerator
from raypipe.realign.retrieve import load_corpus
from raypipe.realign.stage import run_realign

GOOD = b'{"id": 1, "question": "Start with 2. Add 3.", "answer": "Step 1: 2 + 3 = 5\\n#### 5"}'
BAD_LINES = [  # (line, field, reason)
    (b'{"id": 2, "question": "q", "answer": "#### 1"', "<row>", "invalid_json"),
    (b'{"id": 3, "answer": "#### 1"}', "question", "missing_field"),
    (b'{"id": 4, "question": null, "answer": "#### 1"}', "question", "missing_field"),
    (b'{"id": 5, "question": 12, "answer": "#### 1"}', "question", "wrong_type"),
    (b'{"id": 6, "question": " \\t\\n", "answer": "#### 1"}', "question", "empty_field"),
    (b'{"id": 7, "question": "caf\xe9?", "answer": "#### 1"}', "<row>", "not_utf8"),
    (b'[1, 2]', "<row>", "not_an_object"),
    (b'{"id": 1, "question": "again", "answer": "#### 1"}', "id", "duplicate_id"),
    (b'{"id": 8, "question": "\\ud800", "answer": "#### 1"}', "question", "invalid_text"),
    (b'[' * 100_000, "<row>", "invalid_json"),
    (b'{"id": 9, "question": "q", "answer": ["#### 1"]}', "answer", "wrong_type"),
]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    """A byte-order mark, a good row, a blank line, each bad line, a good row."""
    path = tmp_path / "bad.jsonl"
    last = b'{"id": 10, "question": "Start with 1.", "answer": "#### 1"}'
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join([GOOD, b"  ", *(line for line, _, _ in BAD_LINES), last]) + b"\n")
    return path


def expected_rejections() -> list[tuple[int, str, str]]:
    return [(3 + i, field, reason) for i, (_, field, reason) in enumerate(BAD_LINES)]


@pytest.mark.parametrize("loader", ["benchmark", "pairs"])
def test_both_loaders_set_aside_every_bad_row_with_its_reason(bad_file: Path, loader: str) -> None:
    loaded = (load_benchmark(bad_file, "gsm8k") if loader == "benchmark"
              else load_pairs(bad_file, "question", "answer"))
    assert [r["row"] for r in loaded.rows] == [1, len(BAD_LINES) + 3]
    rejected = loaded.rejected
    assert [(r["row"], r["field"], r["reason"]) for r in rejected] == expected_rejections()
    assert all(r.keys() == {"file", "row", "field", "reason", "error", "raw"} for r in rejected)
    assert all(r["file"] == str(bad_file) and r["raw"] for r in rejected)
    by_row = {r["row"]: r for r in rejected}
    assert by_row[10]["error"] == "duplicate id 1 (first at row 1)"
    assert by_row[6]["error"].startswith("expected a string, got a number")
    assert by_row[8]["error"] == "not UTF-8 (byte 26: 0xe9)" and "caf\ufffd?" in by_row[8]["raw"]
    json.dumps(rejected)  # every record can be written to rejected.jsonl


def test_benchmark_answers_may_be_numbers_written_in_digits(tmp_path: Path) -> None:
    path = tmp_path / "numbers.jsonl"
    answers = [42, -3.5, 1e30, True, "#### 7"]
    path.write_text("".join(json.dumps({"question": f"q{i}", "answer": a}) + "\n" for i, a in enumerate(answers)))
    loaded = load_benchmark(path, "gsm8k")
    assert [r["gold"] for r in loaded.rows] == ["42", "-3.5", "7"]
    assert [(r["row"], r["reason"]) for r in loaded.rejected] == [(3, "wrong_type"), (4, "wrong_type")]
    assert "not written out in digits" in loaded.rejected[0]["error"]


def test_the_id_field_is_a_choice(tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    rows = [{"idx": "a", "id": 1, "q": "x", "r": "y"}, {"idx": "a", "id": 1, "q": "x", "r": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_pairs(path, "q", "r", id_field=None).rows) == 2
    loaded = load_pairs(path, "q", "r", id_field="idx")
    assert loaded.rejected[0]["field"] == "idx" and loaded.rejected[0]["error"] == 'duplicate id "a" (first at row 1)'


def test_a_file_with_no_usable_row_says_why(tmp_path: Path) -> None:
    path = tmp_path / "none.jsonl"
    path.write_text('{"prompt": "q", "answer": "#### 1"}\n{"prompt": "r", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=r"none.jsonl: no usable rows \(2 rejected; first: row 1, field 'question': "
                                        r"missing\) \(fields 'question' and 'answer' are read\)"):
        load_benchmark(path, "gsm8k")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        load_pairs(broken, "q", "r")


@pytest.mark.parametrize("loader", ["benchmark", "pairs"])
def test_a_file_with_more_bad_rows_than_allowed_stops_with_the_count(bad_file: Path, loader: str, tiny_model_dir: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """11 of 13 rows are bad: fine at the default (1.0), an error naming the file, the count and the first bad row
    at any lower tolerance; `raypipe eval --max-rejected-fraction` and `realign.max_rejected_fraction` set it."""
    from raypipe.cli import main

    def load(fraction: float) -> object:
        return (load_benchmark(bad_file, "gsm8k", max_rejected_fraction=fraction) if loader == "benchmark"
                else load_pairs(bad_file, "question", "answer", max_rejected_fraction=fraction))

    assert load(11 / 13) is not None
    with pytest.raises(DataError, match=r"bad.jsonl: 11 of 13 rows rejected \(85%\), more than max_rejected_fraction "
                                        r"0.5 allows; first: row 3, field '<row>': "):
        load(0.5)
    # the CLI reads the data before it starts an engine: a one-line error, exit code 2
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(bad_file), "--kind", "gsm8k",
                 "--max-rejected-fraction", "0"]) == 2
    assert "11 of 13 rows rejected (85%), more than max_rejected_fraction 0 allows" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"realign.max_rejected_fraction=1.5 must be between 0 and 1"):
        load_config(None, ["method=realign", "realign.max_rejected_fraction=1.5"])


def test_a_retrieval_corpus_with_a_broken_passage_is_one_clear_error(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"text": "Paris is in France."}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: field '<row>': not UTF-8 \(byte 13: 0xe9\)"):
        load_corpus(corpus)
    corpus.write_text('{"text": "Paris is in France.", "title": "Paris"}\n\n')
    assert load_corpus(corpus) == ["Paris: Paris is in France."]


def test_realign_manifest_counts_rejected_rows_by_reason(bad_file: Path, tmp_path: Path) -> None:
    cfg = load_config(None, ["method=realign", "name=bad", f"output_dir={tmp_path / 'runs'}",
                             f"realign.input={bad_file}", "realign.task=math_puzzles",
                             "realign.rewriter=math_template"])
    metrics = run_realign(cfg)
    reasons: dict[str, int] = {}
    for _, _, reason in BAD_LINES:
        reasons[reason] = reasons.get(reason, 0) + 1
    assert metrics["rows"] == 2 and metrics["rejected_rows"] == len(BAD_LINES)
    assert metrics["rejected_by_reason"] == reasons
    stage = tmp_path / "runs" / "bad" / "round_0" / "realign"
    assert json.loads((stage / "manifest.json").read_text())["metrics"]["rejected_by_reason"] == reasons
    assert len((stage / "rejected.jsonl").read_text().splitlines()) == len(BAD_LINES)


class EchoGenerator(Generator):
    """Answers each prompt with its own length; remembers what it was sent."""

    def __init__(self) -> None:
        self.sent: list[list[int]] = []

    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        self.sent += [list(p) for p in prompts]
        return [[Completion(token_ids=[0], text=str(len(p)), finish_reason="eos")] for p in prompts]

    def load_weights(self, model_dir: str) -> None:
        raise NotImplementedError


class SpaceTokenizer:
    """One token per character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> object:
        return type("Encoded", (), {"input_ids": [ord(c) for c in text]})()


def test_a_local_prompt_too_long_for_the_context_fails_alone() -> None:
    engine = EchoGenerator()
    local = LocalTextGenerator(engine, SpaceTokenizer(), max_model_len=20)
    texts = local.complete(["short", "x" * 16, "", "y" * 10], SamplingSpec(max_tokens=5))
    assert texts == [["5"], [], [], ["10"]]
    assert [len(p) for p in engine.sent] == [5, 10]
    assert (local.usage.requests, local.usage.rejected, local.usage.prompt_tokens) == (2, 2, 15)


def test_context_length_is_the_smaller_of_engine_and_model(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 256}))
    assert context_length(tmp_path, 4096) == 256 and context_length(tmp_path, 128) == 128
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"n_positions": 1024}}))
    assert context_length(tmp_path, 4096) == 1024
    assert context_length(tmp_path / "missing", 4096) == 4096


def test_a_key_pasted_where_its_variables_name_belongs_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYPIPE_TEST_KEY", "secret-value")
    assert key_from_env("RAYPIPE_TEST_KEY", "api_key_env") == "secret-value"
    assert key_from_env("RAYPIPE_UNSET_TEST_KEY", "api_key_env") is None
    with pytest.raises(ConfigError, match="api_key_env must be the NAME of an environment variable") as err:
        key_from_env("sk-proj-abc123", "api_key_env")
    assert "abc123" not in str(err.value)  # the key is never echoed
