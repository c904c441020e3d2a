"""Which of the 46 tasks a query is: the published prompt through any text generator, or keywords offline."""

from __future__ import annotations

import re
from collections.abc import Sequence

from raypipe.engines import SamplingSpec, TextGenerator
from raypipe.realign.tasks import DEFAULT_TASK, load_tasks

CLASSIFY_SPEC = SamplingSpec(temperature=0.0, max_tokens=50)
"""Published inference settings of the task classifier: greedy, at most 50 tokens."""


def classifier_prompt(query: str) -> str:
    """The published prompt shape: the task names between markers, the query between markers, `Task name:`."""
    names = "\n".join(load_tasks())
    return ("You will receive a user's query and a list of predefined tasks. Pick the one task that best "
            "reflects the high-level intent of the query. Spell the task name exactly as it is listed, give no "
            "description, and output only the name.\n\n"
            f"[Existing tasks start]\n{names}\n[Existing tasks end]\n\n"
            f"[User's query start]\n{query}\n[User's query end]\n\nTask name:")


def parse_task(output: str) -> str:
    """The task a classifier named; anything that is not exactly one task name is `default`."""
    text = output.strip().lower()
    text = text[len("task name:"):] if text.startswith("task name:") else text  # a model echoing the cue
    words = re.findall(r"[a-z_]+", text)
    return words[0] if words and words[0] in load_tasks() else DEFAULT_TASK


def keyword_task(query: str) -> str:
    """The task whose keywords occur most often in the query (ties: file order); none: `default`."""
    text = f" {' '.join(query.lower().split())} "
    best, best_hits = DEFAULT_TASK, 0
    for task in load_tasks().values():
        hits = sum(text.count(k) for k in task.keywords)
        if hits > best_hits:
            best, best_hits = task.name, hits
    return best


def classify(queries: Sequence[str], generator: TextGenerator | None) -> list[str]:
    """Task names for the queries: by the model when one is given, by keywords otherwise."""
    if generator is None:
        return [keyword_task(q) for q in queries]
    conversations = [[{"role": "user", "content": classifier_prompt(q)}] for q in queries]
    outputs = generator.chat(conversations, CLASSIFY_SPEC)
    return [parse_task(texts[0]) if texts else DEFAULT_TASK for texts in outputs]
