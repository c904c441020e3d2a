"""The task section of a run: what the rounds run on (raypipe/tasks/).

Split out of raypipe/config.py (which composes it into RunConfig) so the task's keys sit together.
"""

from __future__ import annotations

from dataclasses import dataclass, field


DATA_PATHS = ("train_path", "pool_path", "dev_path", "test_path", "pairs_path")
"""TaskConfig fields naming data files: a local one enters stage fingerprints by its content."""


@dataclass
class TaskConfig:
    """What the rounds run on (raypipe/tasks/): the embedded synthetic task, or a dataset of the user's own.

    `source: synthetic` generates chained arithmetic problems solved one `Step k:` line per operation (the keys
    marked "synthetic"); `source: dataset` reads JSONL / Parquet / `datasets.save_to_disk` files (GSM8K-format
    `#### N` answers, MATH-format `\\boxed{}` solutions, or an explicit answer field). The split sizes cap a
    dataset's splits (first rows kept).
    """

    source: str = "synthetic"
    """'synthetic' (the embedded default, generated here) or 'dataset' (the `*_path` files)."""
    train_path: str | None = None
    """dataset: rows WITH worked solutions (SFT / control / VFT data). Without `pool_path`, its rows after the first
    `sft_problems` are the answer-only pool (their worked solutions never shown); without `dev_path`, its last
    `dev_problems` rows are held out as dev. A file, a save_to_disk folder, or `hf:NAME[:CONFIG]:SPLIT` (a hub
    dataset; needs a network)."""
    pool_path: str | None = None
    """dataset: questions the methods sample on. Only each row's final answer is read, never a worked solution."""
    dev_path: str | None = None
    """dataset: held-out rows for stopping and selection (never the reported figure)."""
    test_path: str | None = None
    """dataset: held-out rows for the reported accuracy (required)."""
    question_field: str = "question"
    """dataset: the field holding the question (MATH files: 'problem')."""
    answer_field: str = "answer"
    """dataset: the field holding the answer: a worked solution ending in GSM8K's `#### N` or holding MATH's
    `\\boxed{}` (its final answer is extracted), or the final answer alone (a string or a number)."""
    solution_field: str | None = None
    """dataset: the field holding the worked solution when it is not `answer_field` (e.g. MATH's 'solution' beside
    an 'answer'); null: the answer field's text is the solution."""
    answer_kind: str | None = None
    """How answers are extracted and compared (raypipe.grading): 'gsm8k', 'math' or 'synthetic'. null: the
    task's own ('synthetic' for the synthetic task; a dataset must name one)."""
    step_delimiter: str = "newline"
    """Where one reasoning step ends: 'newline', 'blank_line', 'step_marker' (before each `Step k:`) or a regular
    expression. Whitespace-only steps are dropped."""
    system_prompt: str | None = None
    """A system message for models with a chat template (a template without system turns ignores it)."""
    instruction: str | None = None
    """Text added on its own line after each question, e.g. "Please reason step by step, and put your final answer
    within \\boxed{}." for an instruct model."""
    pairs_path: str | None = None
    """An existing preference dataset to train stepdpo / dpo / ipo on instead of sampling (every round reads it):
    the Math-Step-DPO-10K schema (`prompt`, `initial_reason_steps`, `chosen`, `rejected`: only the step tokens are
    scored) or TRL's preference format (`prompt`, `chosen`, `rejected`; text or message lists). The task's test
    split still gives the reported accuracy."""
    max_rejected_fraction: float = 1.0
    """dataset: stop with an error when more than this share of a file's rows is set aside (every bad row is
    listed in the init stage's rejected.jsonl either way). 1.0: never stop."""
    num_steps_min: int = 3
    """synthetic: fewest operations per problem. 3 is the easy setting; 4-5 is much harder and more
    seed-dependent."""
    num_steps_max: int = 3
    """synthetic: most operations per problem (drawn uniformly between min and max)."""
    operand_min: int = 1
    """synthetic: smallest start value / operand."""
    operand_max: int = 99
    """synthetic: largest start value / operand. Bigger numbers mean more digits and a later learning phase
    transition."""
    operations: list[str] = field(default_factory=lambda: ["+", "-"])
    """synthetic: operations to draw from: any of '+', '-', '*'. A '-' that would go below 0 becomes '+'."""
    sft_problems: int = 2000
    """Problems WITH worked solutions (the small SFT set). SFT plateaus lower with fewer."""
    pool_questions: int = 4000
    """Questions with final answers only: what the self-generated-data methods sample on."""
    dev_problems: int = 200
    """Held-out problems used to stop SFT (never used for the reported accuracy)."""
    test_problems: int = 500
    """Held-out problems for the reported accuracy before/after each round."""
    seed: int = 1234
    """synthetic: seed of the problem generator; each split uses its own derived stream, so splits never
    overlap."""
