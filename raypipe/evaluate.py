"""Held-out accuracy: greedy decoding through the run's engines, graded by the same grader as training data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raypipe.artifacts import write_rows
from raypipe.config import EngineConfig
from raypipe.data.benchmarks import DataError, load_benchmark
from raypipe.data.steps import format_prompt
from raypipe.engines.base import SamplingSpec
from raypipe.grading import grade
from raypipe.ray_env import init_ray
from raypipe.rollout.generation import EnginePool, generate_rows


@dataclass
class EvalResult:
    accuracy: float
    n: int
    rows: list[dict[str, Any]]
    generated_tokens: int


def evaluate(pool: EnginePool, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str],
             golds: Sequence[str], kind: str, max_new_tokens: int) -> EvalResult:
    """Greedy-decode every question with the step prompt and grade the final answers."""
    rows = [{"qid": i, "question": q, "gold": g,
             "prompt_ids": tokenizer(format_prompt(q), add_special_tokens=False).input_ids}
            for i, (q, g) in enumerate(zip(questions, golds))]
    outputs = generate_rows(pool, rows, SamplingSpec(n=1, temperature=0.0, max_tokens=max_new_tokens))
    graded = []
    for row in outputs:
        verdict = grade(row["completion"], row["gold"], kind)
        graded.append({"qid": row["qid"], "question": row["question"], "gold": row["gold"],
                       "completion": row["completion"], "predicted": verdict.predicted,
                       "correct": verdict.correct, "grade_reason": verdict.reason})
    correct = sum(r["correct"] for r in graded)
    return EvalResult(accuracy=correct / max(len(graded), 1), n=len(graded), rows=graded,
                      generated_tokens=sum(r["num_tokens"] for r in outputs))


def run_benchmark_eval(model_dir: Path, data: Path, kind: str, limit: int | None, engine: EngineConfig,
                       max_new_tokens: int, out: Path | None) -> EvalResult:
    """`raypipe eval`: accuracy of any local HF model directory on a JSONL benchmark, bad rows set aside."""
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    loaded = load_benchmark(data, kind, limit)
    init_ray(8, use_gpu=engine.num_gpus > 0)
    pool = EnginePool(engine).use(str(model_dir))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        result = evaluate(pool, tokenizer, [r["question"] for r in loaded.rows], [r["gold"] for r in loaded.rows],
                          kind, max_new_tokens)
    finally:
        pool.shutdown()
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_rows(out, result.rows, "predictions.parquet")
        (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in loaded.rejected))
    print(f"{data}: accuracy {result.accuracy:.4f} ({sum(r['correct'] for r in result.rows)}/{result.n}), "
          f"{len(loaded.rejected)} row(s) rejected")
    return result
