"""ReAlign: the task catalogue, classification, retrieval, the rewrite prompt and its parsing, the post-filters,
dataset loading, and the stage end to end (offline template; a model behind the OpenAI-compatible API)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.cli import main
from raypipe.config import ConfigError, load_config
from raypipe.data.benchmarks import DataError
from raypipe.data.pairs import load_pairs
from raypipe.realign.classify import classifier_prompt, keyword_task, parse_task
from raypipe.realign.filters import fallback_reason, skip_before_rewrite
from raypipe.realign.retrieve import BM25Retriever, serper_snippets
from raypipe.realign.rewrite import math_template_rewrite, parse_rewrite, rewrite_messages
from raypipe.realign.stage import decide, run_realign
from raypipe.realign.tasks import load_tasks
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]
NEVER_REWRITTEN = {"story_generation", "poem_generation", "advice_giving", "paraphrasing", "code_simplification",
                   "table_extraction", "title_generation", "text_summarization", "note_summarization", "roleplay",
                   "default"}
RETRIEVAL = {"how_to_generation", "open_qa", "fact_verification", "recommendations", "explain_answer"}
GSM8K_ANSWER = "She sold 48/2 = <<48/2=24>>24 in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"


def test_the_catalogue_has_the_46_tasks_in_10_groups() -> None:
    tasks = load_tasks()
    sizes: dict[str, int] = {}
    for task in tasks.values():
        sizes[task.group] = sizes.get(task.group, 0) + 1
        assert task.format and task.description
    assert len(tasks) == 46
    assert sizes == {"generation": 6, "brainstorming": 4, "code": 8, "rewriting": 4, "extraction": 3,
                     "summarization": 3, "conversation": 6, "educational_dialogue": 5, "classification": 5,
                     "others": 2}
    assert {t.name for t in tasks.values() if not t.rewrite} == NEVER_REWRITTEN
    assert {t.name for t in tasks.values() if t.retrieval} == RETRIEVAL
    assert all(h in tasks["math_puzzles"].format for h in ("Analysis:", "Solution:", "Result:", "Conclusion:"))


def test_classifier_prompt_lists_every_task_and_ends_with_the_cue() -> None:
    prompt = classifier_prompt("Write a haiku about rain.")
    listed = prompt.split("[Existing tasks start]\n")[1].split("\n[Existing tasks end]")[0].splitlines()
    assert listed == list(load_tasks())
    assert "[User's query start]\nWrite a haiku about rain.\n[User's query end]" in prompt
    assert prompt.endswith("Task name:")


@pytest.mark.parametrize("output, task", [("open_qa", "open_qa"), ("  math_puzzles\n", "math_puzzles"),
                                          ("Task name: planning.", "planning"), ("poem_generation</s>", "poem_generation"),
                                          ("I think it is a poem", "default"), ("", "default"),
                                          ("open qa", "default"), ("OPEN_QA", "open_qa")])
def test_classifier_output_falls_back_to_default(output: str, task: str) -> None:
    assert parse_task(output) == task


@pytest.mark.parametrize("query, task", [
    ("Write a poem about the sea, with rhyme.", "poem_generation"),
    ("Natalia sold 48 clips in April and half as many in May. How many clips did she sell altogether?",
     "math_puzzles"),
    ("Translate this sentence into French: good morning", "text_to_text_translation"),
    ("Hmm.", "default"),
])
def test_keyword_classifier(query: str, task: str) -> None:
    assert keyword_task(query) == task


def test_bm25_retriever_finds_the_relevant_passages(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    passages = [{"title": "Paris", "text": "Paris is the capital and largest city of France."},
                {"text": "The Nile is a major river flowing north through Africa."},
                {"text": "Sourdough bread is leavened by wild yeast and lactic acid bacteria."}]
    corpus.write_text("\n".join(json.dumps(p) for p in passages) + "\n\n")
    retriever = BM25Retriever(corpus)
    assert retriever.search("What is the capital of France?", 5) == ["Paris: Paris is the capital and largest "
                                                                      "city of France."]
    assert retriever.search("How is sourdough bread leavened?", 1)[0].startswith("Sourdough")
    assert retriever.search("what is the", 5) == []  # stop words only
    corpus.write_text(json.dumps(passages[0]) + "\n" + json.dumps({"title": "no text"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:2: field 'text'"):
        BM25Retriever(corpus)


def test_web_search_results_are_cleaned_in_the_published_order() -> None:
    result = {"answerBox": {"snippet": "Paris"},
              "knowledgeGraph": {"title": "France", "type": "Country", "description": "A country in Europe.",
                                 "attributes": {"Capital": "Paris"}},
              "organic": [{"snippet": "Missing: capital"}, {"snippet": "Paris has been the capital since 508."}]}
    assert serper_snippets(result) == ["Paris", "France: Country.", "A country in Europe.", "France Capital: Paris.",
                                       "Paris has been the capital since 508."]


def test_rewrite_prompt_adaptive_forced_and_evidence() -> None:
    adaptive = rewrite_messages("Q?", "R.", "Answer first.", [], adaptive=True)
    forced = rewrite_messages("Q?", "R.", "Answer first.", ["fact one", "fact two"], adaptive=False)
    assert "copy the original response unchanged" in adaptive[0]["content"]
    assert "copy the original" not in forced[0]["content"] and "evidence" in forced[0]["content"]
    user = forced[1]["content"]
    for block in ("[Question start]\nQ?\n[Question end]", "[Response start]\nR.\n[Response end]",
                  "[Format start]\nAnswer first.\n[Format end]", "[Evidence start]\n1. fact one\n\n2. fact two\n"):
        assert block in user
    assert "[Evidence start]" not in adaptive[1]["content"]


@pytest.mark.parametrize("output, parsed", [
    ("Reasoning: fits.\nRevised response: New text.", ("fits.", "New text.")),
    ("Revised response:\n  Line 1\nLine 2  ", ("", "Line 1\nLine 2")),
    ("Reasoning: fits, but I got cut off", None),
    ("Reasoning: x\nRevised response:   ", None),
    ("Revised response: a\nRevised response: b", None),
])
def test_parse_rewrite(output: str, parsed: tuple[str, str] | None) -> None:
    result = parse_rewrite(output)
    assert (None if result is None else (result.reasoning, result.revised)) == parsed


@pytest.mark.parametrize("original, rewrite, reason", [
    ("Use `x = 1`.\n```python\nx = 1\n```", "Set x to one, as in the example above.", "code_mismatch"),
    ("def f():\n    return 1", "def f():\n    return 1  # returns one\n\nThe function returns one.", None),
    ("B", "The answer is (C), because B is wrong.", None),
    ("B", "Because of the reasons above, the answer is C.", "answer_lost"),
    ("True", "The statement is false.", "answer_lost"),
    (GSM8K_ANSWER, "Analysis: ... Result: 1,272 Conclusion: done in many many words here.", "answer_lost"),
    (GSM8K_ANSWER, "Analysis: two steps. 1. 24 in May. 2. 72 in all. Result: 72. Conclusion: 72.", None),
    ("\\frac{1}{2} is \\boxed{\\frac{1}{2}}", "So the result is \\boxed{0.5}.", None),
    ("one two three four five six seven eight nine ten", "one two three", "too_short"),
    ("42", "The total is 41, one less than the count.", "answer_lost"),
    ("1,200", "Adding both parts gives 1200 in all.", None),
])
def test_post_filters(original: str, rewrite: str, reason: str | None) -> None:
    assert fallback_reason(original, rewrite, 0.5) == reason


def test_planning_needs_a_planning_keyword() -> None:
    assert skip_before_rewrite("Give me a weekly plan for learning Go.", "planning") is None
    assert skip_before_rewrite("What should I eat?", "planning") == "no_planning_keyword"
    assert skip_before_rewrite("What should I eat?", "open_qa") is None


def test_decide_keeps_the_longest_rewrite_or_the_original_with_a_reason() -> None:
    original = "Paris is the capital."
    for options, tag, reason, response in [
        ([], "original", "unparsable_output", original),
        ([("fits", original)], "original", "model_kept_original", original),
        ([("a", "Answer: Paris.\nParis is the capital."), ("b", "Answer: Paris.\nParis is the capital of France.")],
         "rewrite", None, "Answer: Paris.\nParis is the capital of France."),
        ([("a", "Paris.")], "original", "too_short", original),
    ]:
        result = {"response": original, "tag": "original", "reason": None}
        decide(result, original, options, 0.5)
        assert (result["tag"], result["reason"], result["response"]) == (tag, reason, response)


def test_math_template_rewrite_of_a_gsm8k_answer() -> None:
    rewrite = math_template_rewrite(GSM8K_ANSWER)
    assert rewrite is not None and "<<" not in rewrite
    assert "Solution:\n1. She sold 48/2 = 24 in May.\n2. Altogether 48+24 = 72." in rewrite
    assert "- Step 1 computes 48/2 = 24." in rewrite
    assert rewrite.endswith("Result: 72\n\nConclusion: The answer is 72.")
    assert fallback_reason(GSM8K_ANSWER, rewrite, 0.5) is None
    assert math_template_rewrite("No final answer marker here.") is None


def test_bad_rows_are_set_aside_with_file_row_and_field(tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(b'{"q": "fine", "r": "ok"}\n'
                     b'{"q": "no response"}\n'
                     b'not json\n'
                     b'\n'
                     b'{"q": "  ", "r": "empty query"}\n'
                     b'{"q": 3, "r": "number"}\n'
                     b'{"q": "caf\xe9", "r": "latin-1"}\n'
                     b'["a", "list"]\n'
                     b'{"q": "also fine", "r": "yes"}\n')
    loaded = load_pairs(data, "q", "r")
    assert [(r["row"], r["query"]) for r in loaded.rows] == [(1, "fine"), (9, "also fine")]
    assert [(r["row"], r["field"]) for r in loaded.rejected] == [(2, "r"), (3, "<row>"), (5, "q"), (6, "q"),
                                                                 (7, "<row>"), (8, "<row>")]
    assert "not UTF-8" in loaded.rejected[4]["error"] and all(r["file"] == str(data) for r in loaded.rejected)
    with pytest.raises(DataError, match="no usable rows"):
        load_pairs(data, "question", "answer")
    with pytest.raises(DataError, match="no such file"):
        load_pairs(tmp_path / "missing.jsonl", "q", "r")


def test_parquet_and_hf_dataset_folders_load_alike(tmp_path: Path) -> None:
    import datasets

    records = [{"q": "a?", "r": "A."}, {"q": "b?", "r": None}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "pairs.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "hf"))
    for path in (tmp_path / "pairs.parquet", tmp_path / "hf"):
        loaded = load_pairs(path, "q", "r")
        assert [r["query"] for r in loaded.rows] == ["a?"] and loaded.rejected[0]["row"] == 2


def test_bad_realign_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="realign.task='math'"):
        load_config(None, ["method=realign", "realign.task=math"])
    with pytest.raises(ConfigError, match="realign.rewriter"):
        load_config(None, ["method=realign", "realign.rewriter=gpt"])


def test_realign_gsm8k_recipe_runs_offline_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train = shared_data("gsm8k", "train.jsonl")
    args = ["run", str(ROOT / "conf" / "realign_gsm8k.yaml"), f"output_dir={tmp_path}", "realign.limit=300",
            f"realign.input={train}"]
    assert main(args) == 0
    assert "post-filter pass rate: 100.0% of 300" in capsys.readouterr().out
    stage = tmp_path / "realign_gsm8k" / "round_0" / "realign"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["metrics"]["rewritten"] == manifest["metrics"]["rows"] == 300
    out = [json.loads(line) for line in (stage / "realigned.jsonl").read_text().splitlines()]
    source = [json.loads(line) for line in train.read_text().splitlines()[:300]]
    assert [o["question"] for o in out] == [s["question"] for s in source]
    assert all(o["answer"].startswith("Analysis:") and o["realign_tag"] == "rewrite" for o in out)
    assert all(o["answer"].endswith(f"The answer is {s['answer'].split('####')[1].strip()}.")
               for o, s in zip(out, source))
    assert main(args) == 0
    assert json.loads((stage / "manifest.json").read_text())["finished_at"] == manifest["finished_at"]


def mixed_dataset(tmp_path: Path) -> tuple[Path, Path]:
    """Three (query, response) rows of different tasks plus a broken line, and a one-passage corpus."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "Bread dough rises because yeast makes carbon dioxide."}) + "\n")
    data = tmp_path / "mixed.jsonl"
    rows = [{"question": "How do I make bread rise?", "answer": "Use yeast and wait an hour."},
            {"question": "Write a poem about rain.", "answer": "Rain taps the glass."},
            {"question": "Start with 4. Add 5. What is the result?", "answer": "Step 1: 4 + 5 = 9\nThe answer is 9."}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    return data, corpus


def test_realign_with_a_model_classifies_retrieves_rewrites_and_accounts_for_every_row(tmp_path: Path) -> None:
    """The model path end to end with a local engine: a random tiny model with a long context classifies (its
    answers are validated, unknown -> default) and rewrites; it never learnt the output format, so each rewrite
    falls back to the original with its reason. Every row is accounted for."""
    from raypipe.config import ModelConfig
    from raypipe.data.tiny_model import save_tiny_model

    model = save_tiny_model(ModelConfig(max_position_embeddings=4096), ["How do I make bread rise? Step 1:"],
                            tmp_path / "model")
    data, corpus = mixed_dataset(tmp_path)
    cfg = load_config(None, ["method=realign", "name=local", f"output_dir={tmp_path / 'runs'}",
                             f"realign.input={data}", f"realign.corpus={corpus}", "realign.classifier=model",
                             "realign.max_tokens=16", "realign.model.backend=local", f"realign.model.model={model}",
                             "engine.backend=hf", "engine.max_model_len=4096"])
    classified = run_realign(cfg)
    assert (classified["rows"], classified["rejected_rows"]) == (3, 1)
    assert classified["rejected_by_reason"] == {"invalid_json": 1}
    assert sum(classified["tasks"].values()) == 3
    assert classified["usage"]["requests"] == 3 + classified["rewrites_attempted"]  # classify, then rewrite (n=2)
    cfg.realign.task, cfg.name = "how_to_generation", "forced_task"  # every row a retrieval task
    metrics = run_realign(cfg)
    assert metrics["rewrites_attempted"] == 3 and metrics["with_evidence"] == 1  # only the bread query matches
    assert sum(metrics["original_by_reason"].values()) + metrics["rewritten"] == 3
    written = pq.read_table(tmp_path / "runs" / "forced_task" / "round_0" / "realign" / "data.parquet").to_pylist()
    assert written[0]["evidence"] == ["Bread dough rises because yeast makes carbon dioxide."]
    for row in written:
        assert (row["tag"] == "rewrite") == (row["reason"] is None)
        assert row["tag"] == "rewrite" or row["response"] == row["original_response"]
    rejected = (tmp_path / "runs" / "local" / "round_0" / "realign" / "rejected.jsonl").read_text()
    assert '"row": 4' in rejected and "not valid JSON" in rejected


def test_realign_over_http_keeps_the_original_when_the_server_rejects_a_prompt(
        served: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The e2e run's model (256-token context) behind raypipe's Serve app cannot take a rewrite prompt: each
    request is answered 400, each row keeps its original with the reason, and the stage completes."""
    monkeypatch.setenv("RAYPIPE_TEST_API_KEY", served["token"])
    data, _ = mixed_dataset(tmp_path)
    cfg = load_config(None, ["method=realign", "name=http", f"output_dir={tmp_path / 'runs'}",
                             f"realign.input={data}", "realign.task=open_qa", f"realign.model.base_url={served['url']}/v1",
                             "realign.model.api_key_env=RAYPIPE_TEST_API_KEY"])
    metrics = run_realign(cfg)
    assert metrics["original_by_reason"] == {"request_rejected": 3} and metrics["rewritten"] == 0
    assert metrics["usage"]["rejected"] == 3 and metrics["usage"]["requests"] == 0
