"""Shared fixtures: a tiny model and tokenizer built once per test session, offline."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.dpo_vs_trl import TRL_DIR
from raypipe.config import ModelConfig, TaskConfig
from raypipe.data.synthetic import load_splits
from raypipe.data.tiny_model import save_tiny_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(*parts: str) -> Path:
    """A file of ../shared/data: a clear failure under CI (`CI` set), where it must be there; a skip elsewhere."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared/data beside the checkout")
        pytest.skip(f"{path} not present (../shared/data is needed beside the repo)")
    return path


needs_trl = pytest.mark.skipif(not (TRL_DIR / "trl").is_dir(), reason="TRL is not in benchmarks/.deps (`make test` "
                               "and `make bench` install it there)")
"""TRL is never a raypipe dependency: the tests that load raypipe's output with it find it where the Makefile puts
it."""


@pytest.fixture(scope="session")
def task_cfg() -> TaskConfig:
    return TaskConfig(sft_problems=200, pool_questions=200, dev_problems=50, test_problems=50)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, task_cfg: TaskConfig) -> Path:
    """An untrained tiny Llama + tokenizer (random weights) as a normal HF directory."""
    splits = load_splits(task_cfg)
    corpus = [p.prompt + p.solution for p in splits["sft"]] + [p.prompt for p in splits["pool"]]
    return save_tiny_model(ModelConfig(), corpus, tmp_path_factory.mktemp("tiny_model"))


E2E_OVERRIDES = [
    # an easier task and small sizes: a model that learns in about a minute, a round that takes a few more
    "task.num_steps_min=2", "task.num_steps_max=2", "task.operand_max=30", "task.sft_problems=2000",
    "task.pool_questions=400", "task.dev_problems=100", "task.test_problems=100",
    "warmup.target_accuracy=0.5", "warmup.max_steps=1500", "warmup.eval_every_steps=50", "warmup.optim.warmup_steps=50",
    "sampling.questions_per_round=48", "sampling.samples_per_question=6", "sampling.max_new_tokens=48",
    "branch.rollouts=6", "eval.max_new_tokens=48", "engine.batch_size=128", "wandb.mode=offline",
    "model.extra_corpus=[lema]",  # so test_lema's round can start from this run's SFT checkpoint
    # the quickstart runs SFT to the end of its schedule and skips the assessment; these tests stop SFT mid-band
    # and check the assessment, as the recipe did before
    "warmup.optim.lr=1e-3", "warmup.plateau_evals=6", "warmup.min_accuracy=0.2", "eval.assessment_questions=200",
    "train.packing=false",
]


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One true end-to-end run (SFT, then sample -> grade -> branch -> build -> reference -> train -> evaluate).

    Session-scoped: the e2e, resume and branching tests all read this run instead of paying for their own.
    """
    from raypipe.config import load_config
    from raypipe.pipeline import Pipeline

    cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "quickstart.yaml",
                      [*E2E_OVERRIDES, f"output_dir={tmp_path_factory.mktemp('runs')}", "name=e2e"])
    return {"cfg": cfg, "summary": Pipeline(cfg).run()}


def write_gsm8k_format(path: Path, problems: list, bad_rows: tuple[str, ...] = ()) -> Path:
    """The synthetic task's problems reworded as GSM8K rows (a story question; working lines with calculator
    annotations, then `#### N`), plus `bad_rows` written verbatim: a dataset a tiny model can learn."""
    import json

    names = ["Mia", "Tom", "Ana", "Raj"]
    lines = []
    for i, p in enumerate(problems):
        name = names[i % len(names)]
        values = [int(v) for v in p.question.replace(".", " ").split() if v.isdigit()]
        verbs = [step.split()[3] for step in p.steps]
        story = [f"{name} has {values[0]} marbles."]
        story += [f"{name} finds {v} more." if op == "+" else f"{name} gives away {v}." for op, v in
                  zip(verbs, values[1:])]
        working = []
        for step in p.steps:
            a, op, b, _, c = step.split(": ")[1].split()
            working.append(f"{a} {op} {b} = <<{a}{op}{b}={c}>>{c} marbles.")
        lines.append(json.dumps({"question": " ".join(story) + f" How many marbles does {name} have now?",
                                 "answer": "\n".join(working) + f"\n#### {p.answer}"}))
    path.write_text("\n".join([*lines, *bad_rows]) + "\n")
    return path


SERVE_TOKEN = "test-token"
SERVE_LIMITS = ["max_ongoing_requests=2", "max_queued_requests=2", "max_tokens=128", "max_request_bytes=20000"]


@pytest.fixture(scope="session")
def served(e2e_run: dict) -> Iterator[dict]:
    """The e2e run's trained model behind the Serve app (token required, small limits so overload is cheap)."""
    import socket

    from ray import serve

    from raypipe.serve import start
    from serving.settings import TOKEN_ENV

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ[TOKEN_ENV] = SERVE_TOKEN
    try:
        url = start(e2e_run["summary"]["run_dir"], SERVE_LIMITS, port=port)
    finally:
        del os.environ[TOKEN_ENV]
    yield {"url": url, "token": SERVE_TOKEN, "run_dir": Path(e2e_run["summary"]["run_dir"])}
    serve.shutdown()


INTEGRATION_MODULES = {"test_actor_failure", "test_branching", "test_cluster", "test_compare", "test_dataset_e2e",
                       "test_demo_page", "test_engines", "test_offline_pairs", "test_openai_engine",
                       "test_pipeline_e2e", "test_resume", "test_serve_run", "test_serving", "test_tracking",
                       "test_trainer"}
"""Modules whose tests start Ray, vLLM, Serve or a training run (their pure unit tests are few and cheap to lose
from the fast tier)."""
INTEGRATION_FIXTURES = {"e2e_run", "served", "tiny_model_dir"}
"""A test using one of these runs or loads a model, wherever it lives."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the integration tests, so that `make test-fast` (-m "not slow and not integration") is the unit and
    property tier."""
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES or \
                INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
