"""ReAlign's 46 tasks: their groups, format specs, and which are rewritten or retrieval-augmented (data in
tasks.yaml beside this file, so a spec is edited without touching code)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import resources

import yaml

DEFAULT_TASK = "default"
"""What an unrecognised classifier answer falls back to (never rewritten)."""


@dataclass(frozen=True)
class Task:
    name: str
    group: str
    description: str
    keywords: tuple[str, ...]
    """Lower-case phrases that suggest this task in a query (the offline keyword classifier)."""
    rewrite: bool
    """False for the 11 tasks a standard format does not suit (stories, poems, summaries ...)."""
    retrieval: bool
    """True for the 5 knowledge-intensive tasks that get evidence in the rewrite prompt."""
    format: str
    """The format spec the rewrite follows."""


@cache
def load_tasks() -> dict[str, Task]:
    """Every task by name, in file order (the classifier's list and tie-break order)."""
    data = yaml.safe_load(resources.files("raypipe.realign").joinpath("tasks.yaml").read_text())
    return {name: Task(name=name, group=group, description=spec["description"],
                       keywords=tuple(k.lower() for k in spec["keywords"]), rewrite=spec["rewrite"],
                       retrieval=spec["retrieval"], format=" ".join(spec["format"].split()))
            for group, tasks in data["groups"].items() for name, spec in tasks.items()}
