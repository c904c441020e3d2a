"""Kill the driver (SIGKILL) while each stage of a round is in progress, rerun the same command, and compare the
final artefacts with the uninterrupted e2e run's round (same checkpoint, same seed).

Every rerun is the user's own command in a fresh process; the test watches the run folder from outside and kills
the driver once the stage has output on disk but no manifest: mid-write for a stage that writes as it goes
(sampling), and at worst just before the commit for a stage that takes milliseconds (grading), which
`tests.held_driver` holds there so that the kill cannot miss it. A training stage (train, control) is killed once
it has registered a checkpoint (one every step here), and its rerun must resume from it. Sampling is
seeded per prompt, so the resumed run draws the same chains, rollouts and pairs; training is not bit-reproducible
on CPU, so from the trained model on only counts and keys are compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from raypipe.artifacts import KEPT_FINGERPRINT, MANIFEST, ArtifactStore
from raypipe.train.checkpoint import LATEST
from raypipe.train.trainer import CHECKPOINTS
from tests.conftest import E2E_OVERRIDES
from tests.held_driver import HELD_MARKER

ROOT = Path(__file__).resolve().parents[1]
EXACT_STAGES = ("sample", "grade", "branch", "build", "reference", "assessment_data")
"""Stages whose rows depend only on the checkpoint and the seed: equal to the uninterrupted run's, row by row."""
TRAINING_STAGES = ("train", "control")
KILLED = ("sample", "grade", "reference", "train", "assessment_data", "assess", "control")
"""In the order the round runs them, one stage of each kind: vLLM sampling written as it goes (sample; branch,
evaluate and assessment_data's twin), a commit within milliseconds (grade; build's twin), Ray Data writing a
folder (reference, assess), training resumed from a checkpoint (train, control). evaluate_control, the last, is
left to the final rerun."""
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
"""Per-node helpers that run no user code and exit about a minute after their raylet (measured: 65 s)."""
KEYS = {"sample": ("qid", "sample_idx"), "grade": ("qid", "sample_idx"), "branch": ("qid", "sample_idx"),
        "evaluate": ("qid",)}


def _rows(stage_dir: Path) -> list[dict[str, Any]]:
    folder = stage_dir / "data"
    return pq.read_table(folder if folder.is_dir() else stage_dir / "data.parquet").to_pylist()


def _manifest(stage_dir: Path) -> dict[str, Any]:
    return json.loads((stage_dir / MANIFEST).read_text())


def _writing(stage_dir: Path) -> bool:
    """The stage has written some of its output and not yet committed its manifest."""
    return (stage_dir.is_dir() and not (stage_dir / MANIFEST).exists()
            and any(p.is_file() for p in stage_dir.rglob("*")))


def _checkpointed(stage_dir: Path) -> bool:
    """The training stage has a complete checkpoint to resume from."""
    return (stage_dir / CHECKPOINTS / LATEST).is_file()


def _run_until_killed(command: list[str], stage_dir: Path, log: Path, ready: Callable[[Path], bool]) -> None:
    """Start the run holding `stage_dir`'s stage before its commit, SIGKILL the driver once `ready(stage_dir)`,
    and check that the local Ray it started (GCS, raylet, engine actors, training workers) went down with it: Ray
    ties them to the driver, and a survivor could still write into the stage the rerun redoes."""
    label = f"{stage_dir.parent.name}/{stage_dir.name}"
    held = [sys.executable, "-m", "tests.held_driver", label, *command[3:]]
    with log.open("a") as out:
        driver = subprocess.Popen(held, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        while not ready(stage_dir):
            assert driver.poll() is None, f"the run ended before {stage_dir.name} was ready (see {log})"
            assert not (stage_dir / HELD_MARKER).exists(), f"{stage_dir.name} finished before it was ready"
            time.sleep(0.01)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        assert not (stage_dir / MANIFEST).exists(), f"{stage_dir.name} finished before the kill landed"
        deadline = time.monotonic() + 60
        while (left := _session(driver.pid, skip=RAY_AGENTS)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes outlived the killed driver: {left}"
    finally:
        _kill_session(driver.pid)  # leave the machine clean for the next run


def _session(sid: int, skip: tuple[str, ...] = ()) -> list[int]:
    """Live processes of session `sid` (the driver started one; everything it spawned stays in it), except those
    whose command line starts with one of `skip`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            command = (proc / "cmdline").read_text()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z" and not command.startswith(skip):
            found.append(int(proc.name))
    return found


def _kill_session(sid: int) -> None:
    """SIGKILL what is left of session `sid`; a process may exit between the listing and its kill."""
    for pid in _session(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_an_unfinished_stage_keeps_its_checkpoints_only_under_the_same_fingerprint(tmp_path: Path) -> None:
    """The store clears an unfinished stage before rerunning it, except the `keep` folder written under the same
    fingerprint: a killed training stage resumes from its checkpoints, and a changed config starts afresh."""
    store, seen = ArtifactStore(tmp_path), []

    def killed(out: Path) -> dict[str, Any]:
        seen.append(sorted(str(p.relative_to(out)) for p in out.rglob("*")))
        (out / "partial.bin").touch()
        (out / CHECKPOINTS / "step_1").mkdir(exist_ok=True)
        raise KeyboardInterrupt

    for lr in (1, 1, 2):
        with pytest.raises(KeyboardInterrupt):
            store.run(1, "train", {"lr": lr}, [], killed, keep=CHECKPOINTS)
    stamp = f"{CHECKPOINTS}/{KEPT_FINGERPRINT}"
    assert seen == [[CHECKPOINTS, stamp], [CHECKPOINTS, stamp, f"{CHECKPOINTS}/step_1"], [CHECKPOINTS, stamp]]


@pytest.fixture(scope="module")
def resumed(e2e_run: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The e2e round rerun from the e2e SFT checkpoint, killed once inside each of its stages, then finished."""
    baseline = e2e_run["cfg"].run_dir
    out = tmp_path_factory.mktemp("resume")
    command = [sys.executable, "-m", "raypipe", "run", str(ROOT / "conf" / "quickstart.yaml"), *E2E_OVERRIDES,
               f"model.path={baseline / 'round_0' / 'sft' / 'model'}", "warmup.max_steps=0", f"output_dir={out}",
               "name=resumed", "wandb.mode=disabled", "train.checkpoint_every_steps=1"]
    run_dir, log = out / "resumed", out / "driver.log"
    killed = []
    for stage in KILLED:
        ready = _checkpointed if stage in TRAINING_STAGES else _writing
        _run_until_killed(command, run_dir / "round_1" / stage, log, ready)
        killed.append(stage)
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=900)
    with log.open("a") as output:
        output.write(finished.stdout + finished.stderr)
    assert finished.returncode == 0, f"the final rerun failed (see {log})"
    return {"run_dir": run_dir, "baseline": baseline, "killed": killed, "terminal": finished.stdout + finished.stderr,
            "summary": json.loads((run_dir / "summary.json").read_text())}


def test_the_terminal_shows_raypipes_lines_and_the_log_file_the_rest(resumed: dict[str, Any]) -> None:
    """The user's command as a person runs it: Ray's and vLLM's output (worker lines carry `pid=`) goes to the
    run's log file; the terminal gets raypipe's lines and the summary, all within 100 columns."""
    terminal = resumed["terminal"].splitlines()
    assert max(len(line) for line in terminal) <= 100
    assert not [line for line in terminal if "pid=" in line], "a worker's output reached the terminal"
    assert any("accuracy_after" in line for line in terminal) and len(terminal) < 120
    assert "pid=" in (resumed["run_dir"] / "logs" / "console.log").read_text()


def test_every_stage_was_killed_in_progress_and_the_rerun_finished(resumed: dict[str, Any]) -> None:
    assert resumed["killed"] == list(KILLED)
    summary = resumed["summary"]
    assert summary["stages_executed"] == ["round_1/control", "round_1/evaluate_control"], (
        "the last rerun redid only the killed stage and the one after it")
    assert {"round_1/sample", "round_1/train", "round_1/assess"} <= set(summary["stages_skipped"])


@pytest.mark.parametrize("stage", EXACT_STAGES)
def test_seeded_stages_equal_the_uninterrupted_run(resumed: dict[str, Any], stage: str) -> None:
    mine, theirs = _rows(resumed["run_dir"] / "round_1" / stage), _rows(resumed["baseline"] / "round_1" / stage)
    drop = {"model_version"}  # the run folder's own path, the only field that names where the run lives
    assert [{k: v for k, v in r.items() if k not in drop} for r in mine] == [
        {k: v for k, v in r.items() if k not in drop} for r in theirs]


@pytest.mark.parametrize("stage", (*TRAINING_STAGES, "evaluate", "evaluate_control", "assess"))
def test_trained_stages_match_in_counts_and_keys(resumed: dict[str, Any], stage: str) -> None:
    mine, theirs = (_manifest(d / "round_1" / stage)["metrics"] for d in (resumed["run_dir"], resumed["baseline"]))
    if stage in TRAINING_STAGES:
        assert mine["steps"] == theirs["steps"] > mine["resumed_from_step"] > 0, "resumed from a checkpoint"
        assert theirs["resumed_from_step"] == 0 and mine["dropped"] == {"shard_equalise": 0}
        assert (Path(mine["model_dir"]) / "model.safetensors").is_file()
        assert not (resumed["run_dir"] / "round_1" / stage / CHECKPOINTS).exists(), "spent checkpoints removed"
    elif stage == "assess":  # the same chains scored by the same start model; the trained one differs
        assert len(_rows(resumed["run_dir"] / "round_1" / stage)) == len(_rows(resumed["baseline"] / "round_1" / stage))
        assert mine["assessment_before"] == pytest.approx(theirs["assessment_before"])
        assert 0.0 <= mine["assessment_after"] <= 1.0
    else:
        rows = _rows(resumed["run_dir"] / "round_1" / stage)
        assert mine["n"] == theirs["n"] == len(rows)
        assert sorted(r["qid"] for r in rows) == sorted(r["qid"] for r in _rows(resumed["baseline"] / "round_1" / stage))


def test_no_duplicates_and_consistent_manifests(resumed: dict[str, Any]) -> None:
    """Every manifest's row count is its file's; every recorded input is the fingerprint now on disk."""
    run_dir = resumed["run_dir"]
    for manifest_path in sorted(run_dir.glob("round_*/*/" + MANIFEST)):
        stage_dir, manifest = manifest_path.parent, _manifest(manifest_path.parent)
        if "rows" in manifest["metrics"]:
            rows = _rows(stage_dir)
            assert len(rows) == manifest["metrics"]["rows"], stage_dir
            if stage_dir.name in KEYS:
                keys = Counter(tuple(r[k] for k in KEYS[stage_dir.name]) for r in rows)
                assert max(keys.values()) == 1, f"{stage_dir}: duplicate rows"
        for relative, fingerprint in manifest["inputs"].items():
            assert _manifest(run_dir / relative)["fingerprint"] == fingerprint, (stage_dir, relative)
    leftovers = [p for p in run_dir.glob("round_*/*") if not (p / MANIFEST).exists()]
    assert not leftovers, f"half-written stages left behind: {leftovers}"


def test_lema_correct_stage_killed_in_progress_is_redone_identically(e2e_run: dict, tmp_path: Path) -> None:
    """LEMA's correct stage (the policy's seeded mistakes, corrected): killed once its rows are written, before its
    commit; the rerun redoes it (and is killed in the next stage, build, to spare the round's training) and writes
    the same rows."""
    baseline = e2e_run["cfg"].run_dir
    command = [sys.executable, "-m", "raypipe", "run", str(ROOT / "conf" / "quickstart.yaml"), *E2E_OVERRIDES,
               f"model.path={baseline / 'round_0' / 'sft' / 'model'}", "warmup.max_steps=0",
               f"output_dir={tmp_path}", "name=lema", "wandb.mode=disabled", "method=lema", "round_steps=4",
               "sampling.questions_per_round=24", "control.enabled=false", "eval.assessment_questions=0"]
    correct, log = tmp_path / "lema" / "round_1" / "correct", tmp_path / "driver.log"
    _run_until_killed(command, correct, log, lambda stage_dir: (stage_dir / HELD_MARKER).exists())
    written = _rows(correct)
    _run_until_killed(command, tmp_path / "lema" / "round_1" / "build", log, _writing)
    metrics = _manifest(correct)["metrics"]
    assert _rows(correct) == written and written, "the same mistakes and corrections"
    assert metrics["kept"] == sum(r["status"] == "kept" for r in written) > 0
