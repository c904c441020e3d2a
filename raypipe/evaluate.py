"""Held-out accuracy: greedy decoding through the run's engines, graded by the same grader as training data."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raypipe.artifacts import write_rows
from raypipe.config import ConfigError, EngineConfig, TaskConfig
from raypipe.data.benchmarks import DataError, load_benchmark
from raypipe.data.rows import Problem, counts_by_reason, rejected_row
from raypipe.engines.base import SamplingSpec
from raypipe.engines.checks import context_length, require_safetensors
from raypipe.engines.text import prompt_too_long
from raypipe.files import write_atomic
from raypipe.ray_env import init_ray
from raypipe.rollout.generation import EnginePool, generate_rows
from raypipe.tasks import Problem as TaskProblem, Task, make_task


@dataclass
class EvalResult:
    accuracy: float
    """Share of the evaluated questions graded correct."""
    n: int
    """Questions evaluated (those set aside not included)."""
    rows: list[dict[str, Any]]
    generated_tokens: int
    set_aside: list[dict[str, Any]] = field(default_factory=list)
    """Questions never sent to the engine, as {qid, question, problem}: a prompt with no room for its answer in the
    context."""

    def rejected(self) -> list[dict[str, Any]]:
        """The set-aside questions as rejected.jsonl records (`qid`, `field`, `reason`, `error`, `raw`)."""
        return [{"qid": s["qid"], **asdict(s["problem"]), "raw": s["question"]} for s in self.set_aside]


def evaluate(pool: EnginePool, model_dir: str, tokenizer: PreTrainedTokenizerBase, task: Task,
             problems: Sequence[TaskProblem], max_new_tokens: int) -> EvalResult:
    """Greedy-decode every problem with `model_dir` with the task's prompt and grade the final answers with its grader. A prompt
    that leaves no room for `max_new_tokens` in the engine's context is set aside first (vLLM would fail the whole
    batch for it); the set-aside count is part of the result."""
    rows, set_aside = [], []
    for p in problems:
        ids = task.prompt_ids(tokenizer, p.question)
        why = prompt_too_long(len(ids), max_new_tokens, pool.cfg.max_model_len)
        if why is None:
            rows.append({"qid": p.id, "question": p.question, "gold": p.gold, "prompt_ids": ids})
        else:
            set_aside.append({"qid": p.id, "question": p.question,
                              "problem": Problem("question", "prompt_too_long", why)})
    outputs = generate_rows(pool, model_dir, rows, SamplingSpec(n=1, temperature=0.0, max_tokens=max_new_tokens))
    graded = []
    for row in outputs:
        verdict = task.grade(row["completion"], row["gold"])
        graded.append({"qid": row["qid"], "question": row["question"], "gold": row["gold"],
                       "completion": row["completion"], "predicted": verdict.predicted,
                       "correct": verdict.correct, "grade_reason": verdict.reason})
    correct = sum(r["correct"] for r in graded)
    return EvalResult(accuracy=correct / max(len(graded), 1), n=len(graded), rows=graded,
                      generated_tokens=sum(r["num_tokens"] for r in outputs), set_aside=set_aside)


def run_benchmark_eval(model_dir: Path, data: Path, task_cfg: TaskConfig, limit: int | None, engine: EngineConfig,
                       max_new_tokens: int, out: Path | None, max_rejected_fraction: float = 1.0) -> EvalResult:
    """`raypipe eval`: accuracy of any local HF model directory on a JSONL benchmark, prompted and graded as a run's
    task would be (`task_cfg`: answer kind, system prompt, instruction). Bad rows and prompts too long for the model
    are set aside into `out`/rejected.jsonl, counted by reason in `out`/manifest.json; more than
    `max_rejected_fraction` of the file's rows bad is an error before any model runs."""
    kind = task_cfg.answer_kind or "synthetic"
    if not (model_dir / "config.json").is_file():
        raise DataError(f"{model_dir}: not a Hugging Face model directory (no config.json)")
    require_safetensors(model_dir)
    loaded = load_benchmark(data, kind, limit, max_rejected_fraction=max_rejected_fraction)
    engine = replace(engine, max_model_len=context_length(model_dir, engine.max_model_len))
    if max_new_tokens >= engine.max_model_len:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a question in the model's context "
                          f"of {engine.max_model_len} tokens")
    init_ray(8, use_gpu=engine.num_gpus > 0)
    pool = EnginePool(engine)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=engine.trust_remote_code)
        task = make_task(task_cfg)  # its prompt and grader (the rows come from `data`)
        problems = [TaskProblem(id=i, question=r["question"], gold=r["gold"]) for i, r in enumerate(loaded.rows)]
        result = evaluate(pool, str(model_dir), tokenizer, task, problems, max_new_tokens)
    finally:
        pool.shutdown()
    for row in result.rows:  # where each prediction's question is in the file
        row["row"] = loaded.rows[row["qid"]]["row"]
    too_long = [rejected_row(data, loaded.rows[s["qid"]]["row"], s["problem"], loaded.rows[s["qid"]]["question"])
                for s in result.set_aside]
    rejected = sorted(loaded.rejected + too_long, key=lambda r: r["row"])
    by_reason = counts_by_reason(rejected)
    correct = sum(r["correct"] for r in result.rows)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_rows(out, result.rows, "predictions.parquet")
        (out / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
        manifest = {"model": str(model_dir), "data": str(data), "kind": kind, "limit": limit,
                    "max_new_tokens": max_new_tokens, "context": engine.max_model_len, "evaluated": result.n,
                    "correct": correct, "accuracy": result.accuracy, "rejected": len(rejected),
                    "rejected_by_reason": by_reason}
        write_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    reasons = f" ({', '.join(f'{k} {v}' for k, v in by_reason.items())})" if by_reason else ""
    print(f"{data}: accuracy {result.accuracy:.4f} ({correct}/{result.n}), {len(rejected)} row(s) rejected{reasons}")
    return result
