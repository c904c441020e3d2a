"""LEMA's data stage: collect wrong solutions, have a corrector write the three fields, keep the corrections that
reach the gold answer.

Mistakes come from the round's graded samples of the policy and, optionally, from more generator models behind
the text interface. The corrector is the exact one of the embedded task or any model behind the text interface
(few-shot prompt per answer kind). Every mistake leaves a row with its `status`: 'kept', or why it was not.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raypipe.artifacts import write_rows
from raypipe.config import RunConfig
from raypipe.engines import SamplingSpec, TextGenerator, make_text_generator
from raypipe.grading import is_equivalent
from raypipe.lema.format import Correction, corrector_prompt, final_answer, numbered_steps, parse_correction
from raypipe.tasks import Problem, Task
from raypipe.tasks.prompts import plain_prompt

log = logging.getLogger(__name__)
NEXT_SHOT = ("\n\nQuestion:",)
"""Where a few-shot corrector that goes on writing would start an invented next example."""


def policy_mistakes(graded: Sequence[dict[str, Any]], max_per_question: int) -> list[dict[str, Any]]:
    """Distinct wrong completions of the round's samples, at most `max_per_question` per question."""
    kept: dict[int, list[str]] = defaultdict(list)
    out = []
    for row in graded:
        seen = kept[row["qid"]]
        if row["correct"] or row["completion"] in seen or len(seen) >= max_per_question:
            continue
        seen.append(row["completion"])
        out.append({"qid": row["qid"], "question": row["question"], "gold": row["gold"],
                    "completion": row["completion"], "source": "policy"})
    return out


def model_mistakes(generator: TextGenerator, name: str, questions: Sequence[tuple[int, Problem]],
                   spec: SamplingSpec, task: Task, max_per_question: int) -> list[dict[str, Any]]:
    """Wrong completions of another generator model on the same questions (LEMA collects from several), prompted
    with the plain step-by-step prompt (a raw completion endpoint has no chat template of ours)."""
    outputs = generator.complete([plain_prompt(p.question, task.cfg.instruction) for _, p in questions], spec)
    graded = [{"qid": qid, "question": p.question, "gold": p.gold, "completion": text,
               "correct": task.is_correct(text, p.gold)}
              for (qid, p), texts in zip(questions, outputs) for text in texts]
    return [{**m, "source": name} for m in policy_mistakes(graded, max_per_question)]


def correct_mistakes(mistakes: Sequence[dict[str, Any]], task: Task, problems: dict[int, Problem],
                     corrector: TextGenerator | None, spec: SamplingSpec, chat: bool = False) -> list[dict[str, Any]]:
    """Each mistake with its correction fields and `status` ('kept' or the reason it is not usable).

    `corrector` None means the task's exact corrector (a task capability); `chat` sends the few-shot prompt as
    one user message instead of a raw completion."""
    kind = task.answer_kind
    steps = [numbered_steps(m["completion"]) for m in mistakes]
    if corrector is None:
        task.require("exact_corrector", "lema.corrector=exact", "use lema.corrector=model")
        found: list[Correction | str] = []
        for m in mistakes:
            correction = task.exact_correction(problems[m["qid"]], m["completion"])
            found.append(correction if correction is not None else "nothing_to_correct")
    else:
        prompts = [corrector_prompt(kind, m["question"], s) for m, s in zip(mistakes, steps)]
        outputs = (corrector.chat([[{"role": "user", "content": p}] for p in prompts], spec) if chat
                   else corrector.complete(prompts, spec))
        found = [parse_correction(texts[0], len(s)) if texts else "request_rejected"
                 for texts, s in zip(outputs, steps)]
    rows = []
    for mistake, numbered, correction in zip(mistakes, steps, found):
        row = {**mistake, "steps": numbered, "status": correction if isinstance(correction, str) else "kept",
               "incorrect_step": None, "explanation": None, "corrected": None, "predicted": None}
        if isinstance(correction, Correction):
            predicted = final_answer(correction, kind)
            row.update(incorrect_step=correction.incorrect_step, explanation=correction.explanation,
                       corrected=list(correction.corrected), predicted=predicted)
            if predicted is None:
                row["status"] = "no_final_answer"
            elif not is_equivalent(predicted, mistake["gold"], kind):
                row["status"] = "wrong_final_answer"
        rows.append(row)
    return rows


def correction_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mistakes per source, outcomes per reason, and the final-answer filter's pass rate."""
    statuses = Counter(r["status"] for r in rows)
    parsed = sum(r["corrected"] is not None for r in rows)
    return {"mistakes": len(rows), "by_source": dict(Counter(r["source"] for r in rows)),
            "corrections_parsed": parsed, "kept": statuses["kept"],
            "filter_pass_rate": statuses["kept"] / parsed if parsed else None,
            "not_kept_by_reason": {k: v for k, v in statuses.items() if k != "kept"}}


def correction_settings(cfg: RunConfig) -> tuple[Any, ...]:
    """Everything the `correct` stage's output depends on besides its input stages (its fingerprint)."""
    lema = cfg.lema
    return (lema.corrector, lema.corrector_model, lema.corrector_chat, lema.corrector_max_tokens,
            lema.mistake_models, lema.max_mistakes_per_question, lema.evolve_questions, cfg.sampling, cfg.task,
            cfg.engine, cfg.seed)


def run_correction(cfg: RunConfig, task: Task, graded: Sequence[dict[str, Any]], problems: dict[int, Problem],
                   out: Path, sample: Callable[[list[tuple[int, Problem]], int], list[dict[str, Any]]]) -> dict[str, Any]:
    """The round's `correct` stage: mistakes of the policy (and `lema.mistake_models`), corrected and filtered,
    then, with `lema.evolve_questions`, those of evolved questions (`sample` draws the policy's chains for them);
    written to `out`; returns the manifest metrics (counts, pass rate, model-call usage)."""
    from raypipe.lema.evolve import evolve_and_correct

    settings = cfg.lema
    mistakes = policy_mistakes(graded, settings.max_mistakes_per_question)
    questions = sorted({row["qid"] for row in graded})
    usage: dict[str, dict[str, int]] = {}
    spec = SamplingSpec(n=cfg.sampling.samples_per_question, temperature=cfg.sampling.temperature,
                        top_p=cfg.sampling.top_p, max_tokens=cfg.sampling.max_new_tokens)
    for i, model_cfg in enumerate(settings.mistake_models):
        name = f"model_{i}:{model_cfg.model}"
        generator = make_text_generator(model_cfg, cfg.engine, cfg.run_dir.resolve())
        try:
            mistakes += model_mistakes(generator, name, [(q, problems[q]) for q in questions], spec, task,
                                       settings.max_mistakes_per_question)
            usage[name] = generator.usage.as_dict()
        finally:
            generator.close()
    corrector = None
    if settings.corrector == "model":
        corrector = make_text_generator(settings.corrector_model, cfg.engine, cfg.run_dir.resolve())
    try:
        spec = SamplingSpec(max_tokens=settings.corrector_max_tokens, stop=NEXT_SHOT)
        rows = correct_mistakes(mistakes, task, problems, corrector, spec, settings.corrector_chat)
        evolved: dict[str, Any] = {}
        if settings.evolve_questions:
            kept = [r for r in rows if r["status"] == "kept"]
            more, evolved = evolve_and_correct(cfg, task, kept, problems, sample, corrector, spec,
                                               settings.corrector_chat)
            rows += more
        if corrector is not None:
            usage["corrector"] = corrector.usage.as_dict()
    finally:
        if corrector is not None:
            corrector.close()
    write_rows(out, rows)
    metrics = correction_metrics(rows)
    log.info("lema: %d mistakes (%s), %d corrections parsed, %d kept (filter pass rate %s); not kept: %s",
             metrics["mistakes"], metrics["by_source"], metrics["corrections_parsed"], metrics["kept"],
             "-" if metrics["filter_pass_rate"] is None else f"{metrics['filter_pass_rate']:.1%}",
             metrics["not_kept_by_reason"] or "none")
    return {"rows": len(rows), **metrics, **evolved, "usage": usage}
