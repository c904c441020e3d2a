"""What a run needs from its task, checked before anything runs: a setting that needs a capability or a split the
task lacks is a config error naming the setting, never a failure deep inside a round."""

from __future__ import annotations

from raypipe.config import ConfigError, RunConfig
from raypipe.methods import METHODS
from raypipe.tasks.base import Task


def check_task(cfg: RunConfig, task: Task) -> None:
    """Refuse, before anything runs, a config that needs what the task does not have."""
    method = METHODS[cfg.method]
    splits = task.splits
    if method.branches and cfg.branch.localiser == "exact":
        task.require("exact_checker", "branch.localiser=exact", "use branch.localiser=mc")
    if cfg.method == "aft" and cfg.aft.constraint == "rank":
        task.require("exact_checker", "aft.constraint=rank (wrong chains ranked by their first wrong step)",
                     "use aft.constraint=bc or dc")
    if method.corrects and cfg.lema.corrector == "exact":
        task.require("exact_corrector", "lema.corrector=exact", "use lema.corrector=model")
    if method.corrects and cfg.lema.evolve_questions:
        task.require("question_evolver", "lema.evolve_questions > 0", "set it to 0")
    if cfg.warmup.max_steps and not (splits.worked and splits.dev):
        raise ConfigError("the round-0 warm-up (warmup.max_steps > 0) needs worked solutions and dev problems "
                          f"(this task has {len(splits.worked)} and {len(splits.dev)}): set task.train_path, or "
                          "warmup.max_steps=0 for a model that needs no warm-up")
    control = cfg.control.enabled and cfg.method != "sft"
    if (method.uses_worked or control) and not splits.worked:
        needs = f"method {cfg.method}" if method.uses_worked else "the continued-SFT control (control.enabled)"
        raise ConfigError(f"{needs} trains on worked solutions, and this task has none: set task.train_path with "
                          "more than 0 task.sft_problems" + ("" if method.uses_worked else ", or control.enabled=false"))
    if method.samples and not splits.pool and not cfg.task.pairs_path:
        raise ConfigError(f"method {cfg.method} samples on the answer-only pool, and this task's pool is empty "
                          "(set task.pool_path, task.train_path with more than task.sft_problems rows, or task.pairs_path to "
                          "train on an existing pairs file)")
    if cfg.model.path is None and not (splits.worked or splits.pool):
        raise ConfigError("the tiny model (model.path null) is built from the task's questions and solutions, and "
                          "this task has none: set model.path to a Hugging Face model folder, or task.train_path")
    if not splits.test:
        raise ConfigError("the task has no test problems to report accuracy on (task.test_path)")
