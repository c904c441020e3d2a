"""The round loop: one single controller drives every stage, and every stage leaves an artefact.

    round 0   init -> sft_data -> sft -> evaluate                  (the starting policy, cached)
    round r   sample -> grade -> branch -> build -> reference -> train -> evaluate
              control -> evaluate_control                          (SFT continued for the same steps)

A stage is a function of (config, input artefacts) -> artefact; `ArtifactStore.run` skips it when its manifest
matches, which is what makes a rerun resume. The trained checkpoint is the next round's policy and reference.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raypipe.artifacts import ArtifactStore, StageResult, write_rows
from raypipe.config import OptimConfig, RunConfig, save_config
from raypipe.data.synthetic import load_splits
from raypipe.data.tiny_model import save_tiny_model
from raypipe.evaluate import evaluate
from raypipe.grading import grade
from raypipe.methods.sft import sft_rows
from raypipe.methods.stepdpo import build_pairs
from raypipe.ray_env import init_ray
from raypipe.report import Tracker, plot_accuracy, print_summary, write_summary
from raypipe.rollout.branching import Brancher, agreement, branch_row, from_branch_row
from raypipe.rollout.generation import EnginePool
from raypipe.rollout.sampling import grade_samples, prompt_rows, sample_chains, wrong_chains
from raypipe.train.reference import add_reference_logps
from raypipe.train.trainer import DevEval, TrainJob, run_training

log = logging.getLogger(__name__)
ROUND_STAGES = ("sample", "grade", "branch", "build", "reference", "train", "evaluate", "control",
                "evaluate_control")


def model_dir(stage: StageResult) -> str:
    return stage.metrics["model_dir"]


class Pipeline:
    """Runs `cfg.rounds` rounds of the configured method on the embedded task."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run_dir.resolve()
        self.store = ArtifactStore(self.run_dir)
        self.splits = load_splits(cfg.task)
        self.pool = EnginePool(cfg.engine)
        self._tokenizer: PreTrainedTokenizerBase | None = None

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        init_ray(cfg.ray_num_cpus, use_gpu=cfg.train.use_gpu)
        save_config(cfg, self.run_dir / "config.yaml")
        self.tracker = Tracker(cfg, self.run_dir)
        try:
            policy = self.sft(self.sft_data(init := self.init()), init)
            before = self.evaluate(0, "evaluate", policy)
            control, rounds = policy, []
            for r in range(1, cfg.rounds + 1):
                samples = self.sample(r, policy)
                graded = self.grade(r, samples)
                branched = self.branch(r, graded, policy)
                pairs = self.build(r, branched, policy)
                scored = self.reference(r, pairs, policy)
                trained = self.train(r, scored, policy)
                after = self.evaluate(r, "evaluate", trained)
                control_after = None
                if cfg.control.enabled:
                    control = self.control(r, control, trained)
                    control_after = self.evaluate(r, "evaluate_control", control)
                rounds.append(self.round_summary(r, before, after, control_after, branched, pairs))
                self.tracker.log({f"round/{k}": v for k, v in rounds[-1].items() if isinstance(v, (int, float))})
                policy, before = trained, after
        finally:
            self.pool.shutdown()
        summary = {"run": cfg.name, "method": cfg.method, "run_dir": str(self.run_dir), "rounds": rounds,
                   "stages_executed": self.store.executed, "stages_skipped": self.store.skipped}
        write_summary(self.run_dir, summary)
        plot_accuracy(self.run_dir, summary)
        print_summary(summary)
        self.tracker.finish()
        return summary

    # ---- round 0: the starting policy -------------------------------------------------------------------

    def init(self) -> StageResult:
        """The tiny model and tokenizer built from the task's text, or the user's model directory."""
        cfg = self.cfg

        def body(out: Path) -> dict[str, Any]:
            if cfg.model.path:
                return {"model_dir": str(Path(cfg.model.path).resolve())}
            corpus = [p.prompt + p.solution for p in self.splits["sft"]] + [p.prompt for p in self.splits["pool"]]
            return {"model_dir": str(save_tiny_model(cfg.model, corpus, out / "model"))}

        return self.store.run(0, "init", (cfg.task, cfg.model), [], body)

    def sft_data(self, init: StageResult) -> StageResult:
        def body(out: Path) -> dict[str, Any]:
            tokenizer = AutoTokenizer.from_pretrained(model_dir(init))
            return {"rows": write_rows(out, sft_rows(self.splits["sft"], tokenizer))}

        return self.store.run(0, "sft_data", self.cfg.task, [init], body)

    def sft(self, data: StageResult, init: StageResult) -> StageResult:
        """Train on the worked solutions until dev accuracy is mid-band (or plateaus)."""
        cfg, sft = self.cfg, self.cfg.sft
        dev = self.splits["dev"]

        def body(out: Path) -> dict[str, Any]:
            if not sft.max_steps:
                return {"model_dir": model_dir(init), "steps": 0}
            job = TrainJob(kind="sft", model_dir=model_dir(init), output_dir=str(out / "model"),
                           data_path=str(data.dir / "data.parquet"), optim=sft.optim, epochs=10_000,
                           max_steps=sft.max_steps, seed=cfg.seed, log_path=str(out / "train_log.jsonl"),
                           dev_eval=DevEval.from_config(sft, [p.prompt for p in dev], [str(p.answer) for p in dev],
                                                        "synthetic", cfg.eval.max_new_tokens))
            return self._train(job, out, "sft")

        return self.store.run(0, "sft", (sft, cfg.train, cfg.seed), [data, init], body)

    # ---- round r -----------------------------------------------------------------------------------------

    def sample(self, r: int, policy: StageResult) -> StageResult:
        """N chains per question on this round's slice of the answer-only pool."""
        cfg = self.cfg.sampling
        pool = self.splits["pool"]
        ids = [((r - 1) * cfg.questions_per_round + i) % len(pool) for i in range(cfg.questions_per_round)]

        def body(out: Path) -> dict[str, Any]:
            self.pool.use(model_dir(policy))
            start = time.perf_counter()
            samples = sample_chains(self.pool, prompt_rows([(i, pool[i]) for i in ids], self.tokenizer), cfg)
            tokens = sum(s["num_tokens"] for s in samples)
            return {"rows": write_rows(out, samples), "generated_tokens": tokens,
                    "tokens_per_s": tokens / (time.perf_counter() - start)}

        return self.store.run(r, "sample", (cfg, self.cfg.engine), [policy], body)

    def grade(self, r: int, samples: StageResult) -> StageResult:
        pool = dict(enumerate(self.splits["pool"]))

        def body(out: Path) -> dict[str, Any]:
            graded = grade_samples(samples.rows(), pool)
            by_q: dict[int, set[bool]] = {}
            for row in graded:
                by_q.setdefault(row["qid"], set()).add(row["correct"])
            return {"rows": write_rows(out, graded),
                    "sample_accuracy": sum(g["correct"] for g in graded) / max(len(graded), 1),
                    "mixed_questions": sum(len(v) == 2 for v in by_q.values()) / max(len(by_q), 1)}

        return self.store.run(r, "grade", "synthetic", [samples], body)

    def branch(self, r: int, graded: StageResult, policy: StageResult) -> StageResult:
        """Localise the first wrong step of each wrong chain and collect correct continuations before it."""
        cfg = self.cfg

        def body(out: Path) -> dict[str, Any]:
            self.pool.use(model_dir(policy))
            chains = wrong_chains(graded.rows(), self.decode, cfg.branch.max_wrong_per_question)
            start = time.perf_counter()
            brancher = Brancher(cfg.branch, self.pool, self.is_correct, self.decode, cfg.sampling.temperature,
                                cfg.sampling.top_p, cfg.sampling.max_new_tokens)
            rows = [branch_row(c, loc) for c, loc in zip(chains, brancher.localise(chains))]
            rollouts = sum(r["rollouts"] for r in rows)
            return {"rows": write_rows(out, rows), "wrong_chains": len(rows),
                    "localised": sum(r["first_wrong"] is not None for r in rows), "rollouts": rollouts,
                    "rollouts_per_s": rollouts / max(time.perf_counter() - start, 1e-9),
                    "mc_exact_agreement": agreement(rows) if cfg.branch.localiser == "mc" else None}

        return self.store.run(r, "branch", (cfg.branch, cfg.sampling), [graded, policy], body)

    def build(self, r: int, branched: StageResult, policy: StageResult) -> StageResult:
        cfg = self.cfg

        def body(out: Path) -> dict[str, Any]:
            chains, locs = zip(*map(from_branch_row, branched.rows())) if branched.metrics["rows"] else ((), ())
            provenance = {"round": r, "localiser": cfg.branch.localiser, "model_version": model_dir(policy)}
            pairs = build_pairs(chains, locs, self.decode, cfg.branch.max_pairs_per_wrong, provenance)
            return {"rows": write_rows(out, pairs), "n_pairs": len(pairs),
                    "rollouts_per_pair": branched.metrics["rollouts"] / len(pairs) if pairs else None}

        return self.store.run(r, "build", cfg.branch.max_pairs_per_wrong, [branched, policy], body)

    def reference(self, r: int, pairs: StageResult, policy: StageResult) -> StageResult:
        """pi_ref log-probs of every pair, once per round, by a Ray Data pass over the frozen policy."""
        def body(out: Path) -> dict[str, Any]:
            if pairs.metrics["n_pairs"]:
                dataset = add_reference_logps(ray.data.read_parquet(str(pairs.dir / "data.parquet")),
                                              model_dir(policy), use_gpu=self.cfg.train.use_gpu,
                                              max_length=self.cfg.stepdpo.max_length)
                dataset.repartition(1).write_parquet(str(out / "data"))
            return {"rows": pairs.metrics["n_pairs"]}

        return self.store.run(r, "reference", self.cfg.stepdpo.max_length, [pairs, policy], body)

    def train(self, r: int, scored: StageResult, policy: StageResult) -> StageResult:
        cfg, method = self.cfg, self.cfg.stepdpo

        def body(out: Path) -> dict[str, Any]:
            if not scored.metrics["rows"]:
                log.warning("round %d: no pairs, the policy is carried over unchanged", r)
                return {"model_dir": model_dir(policy), "steps": 0}
            job = TrainJob(kind="dpo", model_dir=model_dir(policy), output_dir=str(out / "model"),
                           data_path=str(scored.dir / "data"), optim=method.optim, epochs=method.epochs,
                           beta=method.beta, nll_weight=method.nll_weight, max_length=method.max_length,
                           seed=cfg.seed + r, log_path=str(out / "train_log.jsonl"))
            return self._train(job, out, f"round_{r}/train")

        return self.store.run(r, "train", (method, cfg.train, cfg.seed), [scored, policy], body)

    def control(self, r: int, previous: StageResult, trained: StageResult) -> StageResult:
        """SFT continued on its own data for exactly as many optimiser steps as the method just took."""
        cfg = self.cfg
        steps = trained.metrics["steps"]
        data = self.store.stage_dir(0, "sft_data") / "data.parquet"

        def body(out: Path) -> dict[str, Any]:
            if not steps:
                return {"model_dir": model_dir(previous), "steps": 0}
            optim = replace(cfg.sft.optim, lr=cfg.control.lr, warmup_steps=0)
            job = TrainJob(kind="sft", model_dir=model_dir(previous), output_dir=str(out / "model"),
                           data_path=str(data), optim=optim, epochs=10_000, max_steps=steps, seed=cfg.seed + r,
                           log_path=str(out / "train_log.jsonl"))
            return self._train(job, out, f"round_{r}/control")

        return self.store.run(r, "control", (cfg.control, cfg.sft.optim, steps), [previous], body)

    def evaluate(self, r: int, name: str, policy: StageResult) -> StageResult:
        """Greedy accuracy on the held-out test split."""
        test = self.splits["test"]

        def body(out: Path) -> dict[str, Any]:
            self.pool.use(model_dir(policy))
            start = time.perf_counter()
            result = evaluate(self.pool, self.tokenizer, [p.question for p in test], [str(p.answer) for p in test],
                              "synthetic", self.cfg.eval.max_new_tokens)
            write_rows(out, result.rows)
            log.info("round %d %s: accuracy %.3f on %d problems", r, name, result.accuracy, result.n)
            return {"accuracy": result.accuracy, "n": result.n,
                    "tokens_per_s": result.generated_tokens / (time.perf_counter() - start)}

        return self.store.run(r, name, (self.cfg.eval, self.cfg.task), [policy], body)

    # ---- helpers -----------------------------------------------------------------------------------------

    def _train(self, job: TrainJob, out: Path, prefix: str) -> dict[str, Any]:
        result = run_training(job, self.cfg.train)
        self.tracker.log_training(out / "train_log.jsonl", prefix)
        return {"model_dir": result.output_dir, "steps": result.steps, "train_seconds": result.seconds,
                "tokens_per_s": result.tokens_per_s, "final": result.metrics, "dev_history": result.dev_history}

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The policy's tokenizer (training never changes it, so round 0's serves every round)."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(
                self.cfg.model.path or str(self.store.stage_dir(0, "init") / "model"))
        return self._tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def is_correct(self, text: str, gold: str) -> bool:
        return grade(text, gold, "synthetic").correct

    def round_summary(self, r: int, before: StageResult, after: StageResult, control_after: StageResult | None,
                      branched: StageResult, pairs: StageResult) -> dict[str, Any]:
        seconds = self.store.seconds
        stage_seconds = {n: seconds[f"round_{r}/{n}"] for n in ROUND_STAGES if f"round_{r}/{n}" in seconds}
        return {"round": r, "accuracy_before": before.metrics["accuracy"],
                "accuracy_after": after.metrics["accuracy"],
                "control_accuracy_after": control_after.metrics["accuracy"] if control_after else None,
                "n_pairs": pairs.metrics["n_pairs"], "mc_exact_agreement": branched.metrics["mc_exact_agreement"],
                "rollouts_per_pair": pairs.metrics["rollouts_per_pair"], "stage_seconds": stage_seconds}
