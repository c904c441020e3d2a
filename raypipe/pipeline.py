"""The round loop: one single controller drives every stage, and every stage leaves an artefact.

    round 0   init -> sft_data -> sft -> evaluate                  (the starting policy, cached)
    round r   sample -> grade -> [branch] -> build -> [reference] -> train -> evaluate
              assessment_data -> assess                            (AFT's assessment accuracy, any method)
              control -> evaluate_control                          (SFT continued for the same steps)

Which optional stages run is the method's business (raypipe.methods.METHODS): Step-DPO branches, the DPO family
needs reference log-probs, `sft` does not sample. A stage is a function of (config, input artefacts) -> artefact;
`ArtifactStore.run` skips it when its manifest matches, which is what makes a rerun resume. The trained
checkpoint is the next round's policy and reference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer

from raypipe.artifacts import StageResult, write_rows
from raypipe.config import save_config
from raypipe.data.preference import load_preference_pairs, trl_rows, write_trl_jsonl
from raypipe.data.rows import DataError, write_rejected
from raypipe.data.tiny_model import save_tiny_model
from raypipe.engines.base import derive_seed
from raypipe.evaluate import evaluate
from raypipe.lema.correct import correction_settings, run_correction
from raypipe.methods import BuildInputs
from raypipe.methods.aft import assessment_accuracy, assessment_rows
from raypipe.methods.sft import sft_rows
from raypipe.ray_env import init_ray
from raypipe.report import plot_accuracy, print_summary, round_summary, warmup_summary, write_summary
from raypipe.rollout.branching import Brancher, branch_row, localisation_metrics
from raypipe.rollout.sampling import grade_samples, prompt_rows, sample_chains, wrong_chains
from raypipe.stage_context import StageContext, carried, data_path, model_dir
from raypipe.tasks import Problem
from raypipe.tracking import Tracker
from raypipe.train.objectives import SFTObjective
from raypipe.train.reference import score_sequences, write_reference_logps
from raypipe.train.worker_group import close_worker_groups
from raypipe.train.trainer import CHECKPOINTS, DevEval, TrainJob

log = logging.getLogger(__name__)


TRL_PAIRS_FILE = "pairs.trl.jsonl"
"""The round's preference pairs in TRL's format, beside the build stage's Parquet."""


class Pipeline(StageContext):
    """Runs `cfg.rounds` rounds of the configured method on the configured task (raypipe/tasks/); construction
    (`reuse_from`, `pool`) is StageContext's."""

    def run(self) -> dict[str, Any]:
        cfg, method = self.cfg, self.method
        init_ray(cfg.ray_num_cpus, use_gpu=cfg.train.use_gpu)
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = Tracker(cfg, self.run_dir)
        self.store.on_stage = self.tracker.log_stage
        try:
            self.init_stage = init = self.init()
            worked = self.sft_data(init)
            policy = warmup = self.sft(worked, init)
            before = self.evaluate(0, "evaluate", policy)
            control, rounds = policy, []
            samples = method.samples and not cfg.task.pairs_path  # an existing pairs file replaces sampling
            for r in range(1, cfg.rounds + 1):
                graded = self.grade(r, self.sample(r, policy)) if samples else None
                branched = self.branch(r, graded, policy) if samples and method.branches else None
                corrected = self.correct(r, graded, policy) if samples and method.corrects else None
                built = (self.build(r, worked, graded, branched or corrected, policy) if samples or not method.samples
                         else self.read_pairs(r, init))
                data = self.reference(r, built, policy) if method.reference else built
                trained = self.train(r, data, policy)
                after = self.evaluate(r, "evaluate", trained)
                assessed = (self.assess(r, self.assessment_data(r, policy), policy, trained)
                            if cfg.eval.assessment_questions else None)
                control_after = None
                if cfg.control.enabled and cfg.method != "sft":
                    control = self.control(r, control, worked, trained)
                    control_after = self.evaluate(r, "evaluate_control", control)
                rounds.append(round_summary(r, cfg.method, self.store.seconds, {
                    "before": before, "evaluate": after, "evaluate_control": control_after, "branch": branched,
                    "build": built, "train": trained, "assess": assessed, "correct": corrected}))
                self.tracker.log_round(rounds[-1])
                policy, before = trained, after
        finally:
            if self.owns_pool:
                self.pool.shutdown()
                close_worker_groups()
        summary = {"run": cfg.name, "method": cfg.method, "run_dir": str(self.run_dir),
                   "warmup": warmup_summary(warmup), "rounds": rounds,
                   "stages_executed": self.store.executed, "stages_skipped": self.store.skipped,
                   "stages_reused": self.store.reused}
        write_summary(self.run_dir, summary)
        plot_accuracy(self.run_dir, summary)
        print_summary(summary)
        self.tracker.log_summary(summary)
        self.tracker.finish()
        return summary

    # ---- round 0: the starting policy -------------------------------------------------------------------

    def init(self) -> StageResult:
        """The tiny model and tokenizer built from the task's text, or the user's model directory."""
        cfg = self.cfg

        def body(out: Path) -> dict[str, Any]:
            data = {"splits": self.splits.sizes(), **write_rejected(out, self.splits.rejected)}
            if cfg.model.path:
                return {"model_dir": str(Path(cfg.model.path).resolve()), **data}
            corpus = self.task.tokenizer_corpus(cfg.model.extra_corpus)
            return {"model_dir": str(save_tiny_model(cfg.model, corpus, out / "model")), **data}

        init = self.store.run(0, "init", (cfg.task, cfg.model), [], body)
        if cfg.model.path:  # fingerprinted by content: a matching init may have recorded the weights elsewhere
            return StageResult(init.dir, {**init.manifest, "metrics": {**init.metrics, "model_dir": str(
                Path(cfg.model.path).resolve())}})
        return init

    def sft_data(self, init: StageResult) -> StageResult:
        """The worked solutions as SFT rows: round 0's SFT, the `sft` / `rft` / `aft` methods and the control."""
        def body(out: Path) -> dict[str, Any]:
            tokenizer = AutoTokenizer.from_pretrained(model_dir(init))
            return {"rows": write_rows(out, sft_rows(self.splits.worked, tokenizer, self.task))}

        return self.store.run(0, "sft_data", self.cfg.task, [init], body)

    def sft(self, data: StageResult, init: StageResult) -> StageResult:
        """Train on the worked solutions until dev accuracy is mid-band (or plateaus)."""
        cfg, warmup = self.cfg, self.cfg.warmup
        dev = self.splits.dev

        def body(out: Path) -> dict[str, Any]:
            if not warmup.max_steps:
                return {"model_dir": model_dir(init), "steps": 0}
            job = TrainJob(objective=SFTObjective(), model_dir=model_dir(init), output_dir=str(out / "model"),
                           data_path=str(data_path(data)), optim=warmup.optim, epochs=10_000,
                           max_steps=warmup.max_steps, max_length=warmup.max_length, seed=warmup.seed,
                           log_path=str(out / "train_log.jsonl"),
                           dev_eval=DevEval.from_config(warmup, [self.task.prompt(self.tokenizer, p.question) for p in dev],
                                                        [p.gold for p in dev], self.task.answer_kind,
                                                        cfg.eval.max_new_tokens))
            return self._train(job, out, "sft")

        return carried(self.store.run(0, "sft", (warmup, cfg.train, cfg.eval.max_new_tokens), [data, init], body,
                                       keep=CHECKPOINTS), init)

    # ---- round r -----------------------------------------------------------------------------------------

    def sample(self, r: int, policy: StageResult) -> StageResult:
        """N chains per question on this round's slice of the answer-only pool."""
        cfg = self.cfg.sampling
        pool = self.splits.pool
        ids = [((r - 1) * cfg.questions_per_round + i) % len(pool) for i in range(cfg.questions_per_round)]

        def body(out: Path) -> dict[str, Any]:
            samples, metrics = self._sample([(i, pool[i]) for i in ids], policy, derive_seed(self.cfg.seed, r, "sample"))
            return {"rows": write_rows(out, samples), **metrics}

        return self.store.run(r, "sample", (cfg, self.cfg.engine, self.cfg.seed), [policy], body)

    def grade(self, r: int, samples: StageResult) -> StageResult:
        pool = dict(enumerate(self.splits.pool))

        def body(out: Path) -> dict[str, Any]:
            graded = grade_samples(samples.rows(), pool, self.task)
            by_q: dict[int, set[bool]] = {}
            for row in graded:
                by_q.setdefault(row["qid"], set()).add(row["correct"])
            return {"rows": write_rows(out, graded),
                    "sample_accuracy": sum(g["correct"] for g in graded) / max(len(graded), 1),
                    "mixed_questions": sum(len(v) == 2 for v in by_q.values()) / max(len(by_q), 1)}

        return self.store.run(r, "grade", (self.task.answer_kind, self.task.name), [samples], body)

    def branch(self, r: int, graded: StageResult, policy: StageResult) -> StageResult:
        """Localise the first wrong step of each wrong chain and collect correct continuations before it."""
        cfg = self.cfg

        def body(out: Path) -> dict[str, Any]:
            chains = wrong_chains(graded.rows(), self.step_ends, cfg.branch.max_wrong_per_question)
            start = time.perf_counter()
            brancher = Brancher(cfg.branch, self.pool, model_dir(policy), self.task.is_correct, self.decode,
                                cfg.sampling.temperature, cfg.sampling.top_p, cfg.sampling.max_new_tokens,
                                derive_seed(cfg.seed, r, "branch"))
            rows = [branch_row(c, loc) for c, loc in zip(chains, brancher.localise(chains))]
            rollouts = sum(r["rollouts"] for r in rows)
            return {"rows": write_rows(out, rows), "wrong_chains": len(rows), "rollouts": rollouts,
                    "rollouts_per_s": rollouts / max(time.perf_counter() - start, 1e-9),
                    **localisation_metrics(rows, cfg.branch.localiser, self.task.supports("exact_checker"))}

        fingerprint = (cfg.branch, cfg.sampling, cfg.engine, cfg.seed, cfg.task.step_delimiter)
        return self.store.run(r, "branch", fingerprint, [graded, policy], body)

    def correct(self, r: int, graded: StageResult, policy: StageResult) -> StageResult:
        """LEMA: the round's mistakes (the policy's and `lema.mistake_models`'), corrected and filtered."""
        def chains(problems: list[tuple[int, Problem]], n: int) -> list[dict[str, Any]]:
            sampling = replace(self.cfg.sampling, samples_per_question=n)
            return sample_chains(self.pool, model_dir(policy), prompt_rows(problems, self.tokenizer, self.task), sampling,
                                 derive_seed(self.cfg.seed, r, "correct", n))

        def body(out: Path) -> dict[str, Any]:
            return run_correction(self.cfg, self.task, graded.rows(), dict(enumerate(self.splits.pool)), out, chains)

        return self.store.run(r, "correct", correction_settings(self.cfg), [graded, policy], body)

    def build(self, r: int, worked: StageResult, graded: StageResult | None, extra: StageResult | None,
              policy: StageResult) -> StageResult:
        """The method's training set from this round's data (raypipe/methods/<method>.py); `extra` is the
        branch stage's output (Step-DPO) or the correct stage's (LEMA)."""
        cfg, method = self.cfg, self.method
        inputs = [s for s in (worked, graded, extra, policy) if s is not None]

        def body(out: Path) -> dict[str, Any]:
            provenance = {"round": r, "method": cfg.method, "model_version": model_dir(policy)}
            if method.branches:
                provenance["localiser"] = cfg.branch.localiser
            built = BuildInputs(
                cfg=cfg, round=r, worked=worked.rows(), graded=graded.rows() if graded else [],
                branched=extra.rows() if method.branches else [],
                corrections=extra.rows() if method.corrects else [], eos_id=self.tokenizer.eos_token_id,
                decode=self.decode, encode=self.encode, step_ends=self.step_ends, provenance=provenance)
            rows = method.build(built)
            metrics: dict[str, Any] = {"rows": write_rows(out, rows), **write_rejected(out, built.set_aside)}
            if method.branches:
                metrics["rollouts_per_pair"] = extra.metrics["rollouts"] / len(rows) if rows else None
            if method.reference:  # preference pairs, also in TRL's format for other trainers
                write_trl_jsonl(out / TRL_PAIRS_FILE, trl_rows(rows, self.decode_verbatim))
            return metrics

        return self.store.run(r, "build", (cfg.method, method.settings(cfg), cfg.branch, cfg.seed), inputs, body)

    def read_pairs(self, r: int, init: StageResult) -> StageResult:
        """The round's training set from an existing pairs file (`task.pairs_path`) instead of sampling: the
        question through the task's prompt, bad rows set aside into rejected.jsonl."""
        cfg = self.cfg
        hub = cfg.task.pairs_path.startswith("hf:")  # type: ignore[union-attr]
        path = Path(cfg.task.pairs_path) if hub else Path(cfg.task.pairs_path).resolve()  # type: ignore[arg-type]
        if not hub and not path.exists():
            raise DataError(f"{path}: no such file or folder (task.pairs_path)")
        version = (None, None) if hub else (path.stat().st_size, path.stat().st_mtime_ns)  # a changed file reruns

        def body(out: Path) -> dict[str, Any]:
            rows, rejected = load_preference_pairs(path, self.tokenizer, self.task, cfg.task.max_rejected_fraction)
            write_trl_jsonl(out / TRL_PAIRS_FILE, trl_rows(rows, self.decode_verbatim))
            log.info("round %d: %d pairs read from %s (%d rows set aside)", r, len(rows), path, len(rejected))
            return {"rows": write_rows(out, [{**row, "round": r, "method": cfg.method} for row in rows]),
                    **write_rejected(out, rejected)}

        fingerprint = (str(path), version, cfg.task, cfg.method)
        return self.store.run(r, "build", fingerprint, [init], body)

    def reference(self, r: int, data: StageResult, policy: StageResult) -> StageResult:
        """pi_ref log-probs of every pair, once per round, by a Ray Data pass over the frozen policy."""
        max_length, train = self.method.settings(self.cfg).max_length, self.cfg.train

        def body(out: Path) -> dict[str, Any]:
            if data.metrics["rows"]:
                self.pool.make_room()
                write_reference_logps(str(data_path(data)), out / "data", model_dir(policy), max_length=max_length,
                                      **self._scoring())
            return {"rows": data.metrics["rows"]}

        fingerprint = (max_length, train.bf16, train.logits_chunk_tokens)
        return self.store.run(r, "reference", fingerprint, [data, policy], body)

    def train(self, r: int, data: StageResult, policy: StageResult) -> StageResult:
        """The method's update on its training set, by the Ray Train + DeepSpeed loop."""
        cfg, method = self.cfg, self.method
        settings = method.settings(cfg)

        def body(out: Path) -> dict[str, Any]:
            if not data.metrics["rows"]:
                log.warning("round %d: empty training set, the policy is carried over unchanged", r)
                return {"model_dir": model_dir(policy), "steps": 0}
            job = TrainJob(objective=method.objective(cfg), model_dir=model_dir(policy),
                           output_dir=str(out / "model"), data_path=str(data_path(data)), optim=settings.optim,
                           **self._schedule(settings), max_length=settings.max_length, seed=cfg.seed + r,
                           log_path=str(out / "train_log.jsonl"), lora=settings.lora)
            return self._train(job, out, f"round_{r}/train")

        fingerprint = (cfg.method, settings, cfg.round_steps, cfg.train, cfg.seed)
        return carried(self.store.run(r, "train", fingerprint, [data, policy], body, keep=CHECKPOINTS), policy)

    def assessment_data(self, r: int, policy: StageResult) -> StageResult:
        """Chains sampled by the round's starting policy on dev questions, for assessment accuracy."""
        cfg = self.cfg
        dev = self.splits.dev[: cfg.eval.assessment_questions]

        def body(out: Path) -> dict[str, Any]:
            samples, metrics = self._sample(list(enumerate(dev)), policy, derive_seed(cfg.seed, r, "assessment"))
            graded = grade_samples(samples, dict(enumerate(dev)), self.task)
            write_rows(out, graded, "samples.parquet")
            return {"rows": write_rows(out, assessment_rows(graded, self.tokenizer.eos_token_id)), **metrics}

        fingerprint = (cfg.eval.assessment_questions, cfg.sampling, cfg.engine, cfg.seed)
        return self.store.run(r, "assessment_data", fingerprint, [policy], body)

    def assess(self, r: int, data: StageResult, policy: StageResult, trained: StageResult) -> StageResult:
        """Assessment accuracy (AFT paper) of the policy before and after the round's update."""
        max_length = self.cfg.sampling.max_new_tokens + 64  # the sampled chain and room for its prompt
        train = self.cfg.train

        def body(out: Path) -> dict[str, Any]:
            if not data.metrics["rows"]:
                return {"assessment_before": None, "assessment_after": None}
            self.pool.make_room()
            dataset = ray.data.read_parquet(str(data_path(data)))
            for name, model in (("before", policy), ("after", trained)):
                dataset = score_sequences(dataset, model_dir(model), ("cand",), prefix=f"{name}_", average=True,
                                          max_length=max_length, **self._scoring())
            scored = dataset.to_pandas()
            write_rows(out, scored.to_dict("records"))
            qids, positive = scored["qid"].tolist(), scored["positive"].tolist()
            return {f"assessment_{name}": assessment_accuracy(qids, positive, scored[f"{name}_cand_logps"].tolist())
                    for name in ("before", "after")}

        fingerprint = (max_length, train.bf16, train.logits_chunk_tokens)
        return self.store.run(r, "assess", fingerprint, [data, policy, trained], body)

    def control(self, r: int, previous: StageResult, worked: StageResult, trained: StageResult) -> StageResult:
        """SFT continued on its own data for exactly as many optimiser steps as the method just took."""
        cfg = self.cfg
        steps = trained.metrics["steps"]

        def body(out: Path) -> dict[str, Any]:
            if not steps:
                return {"model_dir": model_dir(previous), "steps": 0}
            job = TrainJob(objective=SFTObjective(), model_dir=model_dir(previous), output_dir=str(out / "model"),
                           data_path=str(data_path(worked)), optim=cfg.sft.optim, epochs=10_000, max_steps=steps,
                           max_length=cfg.sft.max_length, seed=cfg.seed + r, log_path=str(out / "train_log.jsonl"),
                           lora=cfg.sft.lora)
            return self._train(job, out, f"round_{r}/control")

        return carried(self.store.run(r, "control", (cfg.sft, steps, cfg.train, cfg.seed), [previous, worked],
                                       body, keep=CHECKPOINTS), previous)

    def evaluate(self, r: int, name: str, policy: StageResult) -> StageResult:
        """Greedy accuracy on the held-out split `eval.split` (test, or dev for selection runs)."""
        problems = self.splits.dev if self.cfg.eval.split == "dev" else self.splits.test

        def body(out: Path) -> dict[str, Any]:
            start, refreshed = time.perf_counter(), self.pool.refresh_seconds
            result = evaluate(self.pool, model_dir(policy), self.tokenizer, self.task, problems,
                              self.cfg.eval.max_new_tokens)
            write_rows(out, result.rows)
            log.info("round %d %s: accuracy %.3f on %d problems", r, name, result.accuracy, result.n)
            return {"accuracy": result.accuracy, "n": result.n, **write_rejected(out, result.rejected()),
                    "tokens_per_s": result.generated_tokens / (time.perf_counter() - start),
                    "weight_refresh_seconds": self.pool.refresh_seconds - refreshed}

        return self.store.run(r, name, (self.cfg.eval.max_new_tokens, self.cfg.eval.split, self.cfg.task,
                                        self.cfg.engine), [policy], body)
