"""Tasks: what the rounds run on. `make_task(cfg.task)` is the only place a task kind is chosen."""

from raypipe.config import TaskConfig
from raypipe.tasks.base import CAPABILITIES, Problem, Splits, Task
from raypipe.tasks.dataset import DatasetTask
from raypipe.tasks.prompts import build_prompt, chat_messages
from raypipe.tasks.synthetic import SyntheticTask

TASKS: dict[str, type[Task]] = {"synthetic": SyntheticTask, "dataset": DatasetTask}


def make_task(cfg: TaskConfig) -> Task:
    return TASKS[cfg.source](cfg)


__all__ = ["CAPABILITIES", "TASKS", "Problem", "Splits", "Task", "build_prompt", "chat_messages", "make_task"]
