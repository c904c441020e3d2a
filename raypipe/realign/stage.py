"""`method=realign`: a data stage that rewrites the responses of a (query, response) dataset.

    load -> classify (46 tasks) -> [retrieve evidence] -> rewrite (model, or the offline math template)
         -> post-filters -> data.parquet + realigned.jsonl + rejected.jsonl + manifest with the statistics

Every row leaves with a `tag` ('rewrite' or 'original') and, for an original, the reason: the task is never
rewritten, the model kept it (adaptive rewriting), its output could not be parsed, or a post-filter caught it.
The model calls go through the text interface (an OpenAI-compatible endpoint or a local engine); their cache
makes a rerun after a kill cheap.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from raypipe.artifacts import ArtifactStore, write_rows
from raypipe.config import RunConfig, save_config
from raypipe.console import terminal
from raypipe.data.pairs import load_pairs
from raypipe.data.rows import counts_by_reason
from raypipe.engines import SamplingSpec, TextGenerator, make_text_generator
from raypipe.engines.checks import key_from_env
from raypipe.realign.classify import classify
from raypipe.realign.filters import fallback_reason, skip_before_rewrite
from raypipe.realign.retrieve import BM25Retriever, Retriever, SerperRetriever
from raypipe.realign.rewrite import math_template_rewrite, parse_rewrite, rewrite_messages
from raypipe.realign.tasks import load_tasks

log = logging.getLogger(__name__)
MATH_TASK = "math_puzzles"
"""The one task the offline math template can rewrite."""


def run_realign(cfg: RunConfig) -> dict[str, Any]:
    """Run (or skip, when its manifest matches) the ReAlign stage of `cfg`; print and return its statistics."""
    run_dir = cfg.run_dir.resolve()
    save_config(cfg, run_dir / "config.yaml")
    source = Path(cfg.realign.input).resolve()
    inputs = {"input": file_version(source), "corpus": file_version(Path(cfg.realign.corpus).resolve())
              if cfg.realign.corpus else None, "web_search": bool(web_search_key(cfg))}
    store = ArtifactStore(run_dir)
    stage = store.run(0, "realign", (cfg.realign, inputs, cfg.engine), [],
                      lambda out: realign_dataset(cfg, source, out))
    print_stats(stage.metrics, stage.dir)
    return stage.metrics


def file_version(path: Path) -> dict[str, Any]:
    """What identifies an input file's content for the stage fingerprint: path, size, modification time."""
    stat = path.stat() if path.exists() else None
    return {"path": str(path), "size": stat.st_size if stat else None, "mtime_ns": stat.st_mtime_ns if stat else None}


def realign_dataset(cfg: RunConfig, source: Path, out: Path) -> dict[str, Any]:
    settings = cfg.realign
    loaded = load_pairs(source, settings.query_field, settings.response_field, settings.limit,
                        max_rejected_fraction=settings.max_rejected_fraction)
    rows = loaded.rows
    needs_model = settings.classifier == "model" or settings.rewriter == "model"
    generator = make_text_generator(settings.model, cfg.engine, cfg.run_dir.resolve()) if needs_model else None
    try:
        queries = [r["query"] for r in rows]
        if settings.task:
            tasks = [settings.task] * len(rows)
        else:
            tasks = classify(queries, generator if settings.classifier == "model" else None)
        results = rewrite_rows(cfg, rows, tasks, generator, retriever(cfg))
        usage = generator.usage.as_dict() if generator else {}
    finally:
        if generator is not None:
            generator.close()
    written = [{"row": r["row"], "query": r["query"], "original_response": r["response"], **result}
               for r, result in zip(rows, results)]
    write_rows(out, written)
    with (out / "realigned.jsonl").open("w") as f:  # the input rows, response replaced, ready for SFT
        for r, result in zip(rows, results):
            f.write(json.dumps({**r["record"], settings.response_field: result["response"],
                                "realign_task": result["task"], "realign_tag": result["tag"]}, default=str) + "\n")
    with (out / "rejected.jsonl").open("w") as f:
        for rejected in loaded.rejected:
            f.write(json.dumps(rejected) + "\n")
    reasons = Counter(r["reason"] for r in results if r["tag"] == "original")
    asked = sum(r["asked"] for r in results)
    rewritten = sum(r["tag"] == "rewrite" for r in results)
    return {"rows": len(rows), "rejected_rows": len(loaded.rejected),
            "rejected_by_reason": counts_by_reason(loaded.rejected), "rewritten": rewritten,
            "kept_original": len(rows) - rewritten, "rewrites_attempted": asked,
            "pass_rate": rewritten / asked if asked else None, "original_by_reason": dict(reasons),
            "tasks": dict(Counter(tasks).most_common()), "with_evidence": sum(bool(r["evidence"]) for r in results),
            "usage": usage}


def web_search_key(cfg: RunConfig) -> str | None:
    return key_from_env(cfg.realign.web_search_key_env, "realign.web_search_key_env")


def retriever(cfg: RunConfig) -> Retriever | None:
    """Web search when its key is in the environment, else BM25 over the configured corpus, else none."""
    key = web_search_key(cfg)
    if key:
        return SerperRetriever(key)
    if cfg.realign.corpus:
        return BM25Retriever(Path(cfg.realign.corpus))
    return None


def rewrite_rows(cfg: RunConfig, rows: list[dict[str, Any]], tasks: list[str], generator: TextGenerator | None,
                 search: Retriever | None) -> list[dict[str, Any]]:
    """Per row: the response to keep, `tag`, `reason` (for an original), the task, evidence and reasoning."""
    settings = cfg.realign
    catalogue = load_tasks()
    results: list[dict[str, Any]] = []
    pending: list[int] = []
    for i, (row, task) in enumerate(zip(rows, tasks)):
        spec = catalogue[task]
        result = {"task": task, "group": spec.group, "response": row["response"], "tag": "original",
                  "reason": None, "evidence": [], "reasoning": None, "asked": False}
        results.append(result)
        if not spec.rewrite:
            result["reason"] = "task_not_rewritten"
        elif (skip := skip_before_rewrite(row["query"], task)) is not None:
            result["reason"] = skip
        elif settings.rewriter == "math_template" and task != MATH_TASK:
            result["reason"] = "no_offline_rewriter"  # the template only knows the math format
        else:
            result["asked"] = True
            pending.append(i)
            if spec.retrieval and search is not None:
                result["evidence"] = search.search(row["query"], settings.evidence_k)
    if settings.rewriter == "math_template":
        candidates = [[math_template_rewrite(rows[i]["response"])] for i in pending]
        parsed = [[(None, c) for c in group if c is not None] for group in candidates]
    else:
        conversations = [rewrite_messages(rows[i]["query"], rows[i]["response"], catalogue[tasks[i]].format,
                                          results[i]["evidence"], settings.adaptive) for i in pending]
        spec = SamplingSpec(n=settings.samples, temperature=settings.temperature, top_p=settings.top_p,
                            max_tokens=settings.max_tokens)
        outputs = generator.chat(conversations, spec) if pending else []  # type: ignore[union-attr]
        parsed = [[(p.reasoning, p.revised) for p in map(parse_rewrite, group) if p is not None]
                  for group in outputs]
        for i, group in zip(pending, outputs):
            if not group:
                results[i]["reason"] = "request_rejected"
    for i, options in zip(pending, parsed):
        if results[i]["reason"] is None:
            decide(results[i], rows[i]["response"], options, settings.min_length_ratio)
    return results


def decide(result: dict[str, Any], original: str, options: list[tuple[str | None, str]],
           min_length_ratio: float) -> None:
    """Keep the longest parsed rewrite unless it is the original again or a post-filter rejects it."""
    if not options:
        result["reason"] = "unparsable_output"
        return
    reasoning, revised = max(options, key=lambda o: len(o[1]))
    result["reasoning"] = reasoning
    if revised.strip() == original.strip():
        result["reason"] = "model_kept_original"
        return
    reason = fallback_reason(original, revised, min_length_ratio)
    if reason is not None:
        result["reason"] = reason
        return
    result.update(response=revised, tag="rewrite")


def print_stats(metrics: dict[str, Any], stage_dir: Path, console: Console | None = None) -> None:
    console = console or terminal()
    reasons = ", ".join(f"{k} {v}" for k, v in metrics.get("rejected_by_reason", {}).items())  # older manifests
    console.print(f"ReAlign: {metrics['rows']} rows, {metrics['rejected_rows']} rejected input rows set aside"
                  + (f" ({reasons})" if reasons else ""))
    table = Table()
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_row("rewritten", str(metrics["rewritten"]))
    for reason, count in sorted(metrics["original_by_reason"].items(), key=lambda kv: -kv[1]):
        table.add_row(f"original: {reason}", str(count))
    console.print(table)
    if metrics["pass_rate"] is not None:
        console.print(f"post-filter pass rate: {metrics['pass_rate']:.1%} of {metrics['rewrites_attempted']} "
                      "rewrites asked for")
    tasks = ", ".join(f"{name} {count}" for name, count in list(metrics["tasks"].items())[:8])
    console.print(f"tasks: {tasks}")
    if metrics["usage"]:
        console.print(f"model calls: {metrics['usage']}")
    console.print(f"output: {stage_dir / 'realigned.jsonl'} (rows: {stage_dir / 'data.parquet'}, "
                  f"rejected rows: {stage_dir / 'rejected.jsonl'})")
