"""Training on an existing preference file: the Math-Step-DPO-10K schema and TRL's format read with bad rows set
aside, only the compared tokens scored, and a Step-DPO round run from the file without sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from raypipe.config import TaskConfig, load_config
from raypipe.data.preference import load_preference_pairs
from raypipe.data.rows import DataError
from raypipe.data.steps import COT_PREFILL, format_prompt
from raypipe.data.synthetic import generate_split
from raypipe.tasks import make_task
from benchmarks.dpo_vs_trl import import_trl
from tests.conftest import needs_trl

ROOT = Path(__file__).resolve().parents[1]
TASK = make_task(TaskConfig(sft_problems=10, pool_questions=10, dev_problems=10, test_problems=10))


def _wrong(step: str) -> str:
    """The step with its result off by one."""
    head, result = step.rsplit(" ", 1)
    return f"{head} {int(result) + 1}"


def write_step_dpo_pairs(path: Path, n: int) -> Path:
    """A Math-Step-DPO-10K-schema file from the synthetic task's true steps (the 2nd step compared), plus two bad
    rows: one without `rejected`, one whose chosen and rejected are the same."""
    rows = []
    for p in generate_split(TaskConfig(), "pool", n):
        rows.append({"prompt": p.question, "initial_reason_steps": COT_PREFILL + p.steps[0] + "\n",
                     "chosen": p.steps[1] + "\n", "rejected": _wrong(p.steps[1]) + "\n",
                     "full_chosen": p.solution, "answer": str(p.answer), "dataset": "synthetic"})
    rows.append({"prompt": "q", "initial_reason_steps": "", "chosen": "a"})
    rows.append({"prompt": "q", "initial_reason_steps": "", "chosen": "a", "rejected": "a"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_trl_pairs(path: Path, n: int) -> Path:
    """TRL's preference format: half plain text, half conversational."""
    rows = []
    for i, p in enumerate(generate_split(TaskConfig(), "pool", n)):
        wrong = p.solution.replace(p.steps[-1], _wrong(p.steps[-1]))
        if i % 2:
            rows.append({"prompt": [{"role": "user", "content": p.question}],
                         "chosen": [{"role": "assistant", "content": p.solution}],
                         "rejected": [{"role": "assistant", "content": wrong}]})
        else:
            rows.append({"prompt": format_prompt(p.question), "chosen": p.solution, "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_step_schema_scores_only_the_step_without_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, rejected = load_preference_pairs(write_step_dpo_pairs(tmp_path / "p.jsonl", 4), tok, TASK)
    assert len(rows) == 4 and [(r["row"], r["field"], r["reason"]) for r in rejected] == [
        (5, "rejected", "missing_field"), (6, "chosen", "same_as_rejected")]
    first = rows[0]
    for side in ("chosen", "rejected"):
        ids, mask = first[f"{side}_ids"], first[f"{side}_mask"]
        assert tok.decode([t for t, m in zip(ids, mask) if m]) == first[side]
        assert tok.eos_token_id not in ids
        context = tok.decode(ids[: mask.index(1)])
        assert context.count(COT_PREFILL) == 1, "the plain prompt's pre-fill is not repeated"
        assert context == format_prompt(first["prompt"]) + context.split(COT_PREFILL)[1]


def test_trl_format_text_and_messages_end_with_eos(tiny_model_dir: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, rejected = load_preference_pairs(write_trl_pairs(tmp_path / "t.jsonl", 4), tok, TASK)
    assert len(rows) == 4 and not rejected
    text, chat = rows[0], rows[1]
    for row in (text, chat):
        assert row["chosen_ids"][-1] == tok.eos_token_id and row["chosen_mask"][-1] == 1
        prompt = tok.decode(row["chosen_ids"][: row["chosen_mask"].index(1)])
        assert prompt.endswith(COT_PREFILL), "messages go through the model's chat template"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl: no usable rows .*field 'prompt': message 0"):
        load_preference_pairs(broken, tok, TASK)


@pytest.fixture(scope="module")
def pairs_round(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One Step-DPO round on a Math-Step-DPO-10K file (the TRL format's loader is tested above; the round after
    it is the same)."""
    from raypipe.pipeline import Pipeline

    tmp_path = tmp_path_factory.mktemp("pairs_round")
    pairs = write_step_dpo_pairs(tmp_path / "pairs.jsonl", 32)
    method = "stepdpo"
    cfg = load_config(ROOT / "conf" / "quickstart_mini.yaml", [
        f"method={method}", f"task.pairs_path={pairs}", f"model.path={tiny_model_dir}", "warmup.max_steps=0",
        "round_steps=2", f"{method}.optim.batch_size=16", f"output_dir={tmp_path / 'runs'}", "wandb.mode=disabled"])
    return {"cfg": cfg, "summary": Pipeline(cfg).run()}


def test_a_round_trains_on_an_existing_pairs_file(pairs_round: dict) -> None:
    import datasets

    from raypipe.pipeline import TRL_PAIRS_FILE

    cfg, summary = pairs_round["cfg"], pairs_round["summary"]
    round_1 = summary["rounds"][0]
    assert round_1["n_pairs"] == 32 and round_1["train_steps"] == 2
    assert "round_1/sample" not in summary["stages_executed"], "no sampling: the file is the training set"
    build = cfg.run_dir / "round_1" / "build"
    manifest = json.loads((build / "manifest.json").read_text())["metrics"]
    assert manifest["rejected"] == 2
    reference = datasets.load_dataset("parquet", data_files=str(cfg.run_dir / "round_1/reference/data/*.parquet"))
    assert reference["train"].num_rows == 32 and "ref_chosen_logps" in reference["train"].column_names
    trl = datasets.load_dataset("json", data_files=str(build / TRL_PAIRS_FILE))["train"]
    assert trl.column_names == ["prompt", "chosen", "rejected"] and trl.num_rows == 32
    assert all(isinstance(v, str) and v for row in trl for v in row.values())


@needs_trl
def test_trl_dpo_trainer_takes_the_exported_pairs_unchanged(pairs_round: dict, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    """The round's pairs.trl.jsonl, loaded with `datasets` and handed to TRL's own DPOTrainer as is: every row
    survives TRL's preprocessing, TRL's prompt tokens are the ones raypipe trained on, and two steps train."""
    import datasets
    import pyarrow.parquet as pq

    from raypipe.pipeline import TRL_PAIRS_FILE

    trl = import_trl()
    build = pairs_round["cfg"].run_dir / "round_1" / "build"
    data = datasets.load_dataset("json", data_files=str(build / TRL_PAIRS_FILE))["train"]
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, learning_rate=1e-3,
                         use_cpu=True, bf16=False, report_to="none", save_strategy="no", disable_tqdm=True)
    trainer = trl.DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert trainer.train_dataset.num_rows == 32
    ours = pq.read_table(build / "data.parquet").to_pylist()
    theirs = {tuple(r["prompt_ids"]) for r in trainer.train_dataset}
    assert {tuple(r["chosen_ids"][:r["chosen_mask"].index(1)]) for r in ours} == theirs
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss) and result.training_loss > 0
