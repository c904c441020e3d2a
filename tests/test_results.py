"""Kept results: record.json (command, commit, machine, date, wall time), and `--results` on `raypipe run` and
`raypipe compare`."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

import pytest

from raypipe.cli import main as raypipe_main
from raypipe.compare import ArmConfig, CompareConfig, load_compare
from raypipe.config import save_config
from raypipe.results import begin, git_state, keep, machine

ROOT = Path(__file__).resolve().parents[1]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit: code, and an earlier kept result under results/."""
    root = tmp_path / "repo"
    (root / "results").mkdir(parents=True)
    (root / "code.py").write_text("x = 1\n")
    (root / "results" / "old.txt").write_text("0.5\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "first")
    return root


def fake_nvidia_smi(folder: Path, script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nvidia-smi` on PATH, as the shell `script` (only it: the machine's own, if any, is hidden)."""
    folder.mkdir()
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/bin/sh\n{script}\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}/usr/bin{os.pathsep}/bin")


def test_the_record_names_the_command_the_commit_and_the_machine(
        repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    fake_nvidia_smi(tmp_path / "bin", "printf 'NVIDIA H200\\nNVIDIA H200\\n'", monkeypatch)
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"rounds": []}')
    (run / "config.yaml").write_text("seed: 0\n")
    dest = tmp_path / "results" / "quick"
    before = datetime.now(timezone.utc).replace(microsecond=0)
    start = begin(dest, "raypipe", ["run", "conf/quickstart.yaml", f"model.path={home}/models/m",
                                    f"{home}/a b", "--results", "results/quick"], repo=repo)
    record = keep(dataclasses.replace(start, monotonic=start.monotonic - 125), [run / "summary.json",
                                                                                run / "config.yaml"])
    written = (dest / "record.json").read_text()
    assert json.loads(written) == record
    assert set(record) == {"command", "git_commit", "git_dirty", "date", "wall_seconds", "machine", "files"}
    assert record["command"] == ("raypipe run conf/quickstart.yaml model.path=~/models/m '~/a b' "
                                 "--results results/quick")
    assert str(home) not in written
    assert record["git_commit"] == git(repo, "rev-parse", "HEAD") and len(record["git_commit"]) == 40
    assert record["git_dirty"] is False
    date = datetime.fromisoformat(record["date"])
    assert date.utcoffset().total_seconds() == 0 and before <= date <= datetime.now(timezone.utc)
    assert 125 <= record["wall_seconds"] < 185
    box = record["machine"]
    assert box["cores"] == os.cpu_count() and box["gpus"] == ["NVIDIA H200", "NVIDIA H200"]
    assert box["python"] == platform.python_version() and box["cpu"]
    assert box["libraries"]["torch"] == importlib.metadata.version("torch")
    assert box["libraries"]["ray"] == importlib.metadata.version("ray")
    if Path("/proc/meminfo").is_file():
        assert 0 < box["memory_gib"] < 1 << 16
    assert record["files"] == ["config.yaml", "summary.json"]
    for name in record["files"]:
        assert (dest / name).read_bytes() == (run / name).read_bytes()


def test_dirty_means_tracked_code_differs_from_the_commit(repo: Path, tmp_path: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    (repo / "notes.txt").write_text("untracked\n")
    (repo / "results" / "old.txt").write_text("0.6\n")  # a rerun's output: not code
    assert git_state(repo) == (head, False)
    (repo / "code.py").write_text("x = 2\n")
    assert git_state(repo) == (head, True)
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_state(outside) == (None, None)


def test_no_gpu_is_null(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "failing", "echo 'NVIDIA-SMI has failed' >&2; exit 9", monkeypatch)
    assert machine()["gpus"] is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert machine()["gpus"] is None


class FakePipeline:
    """Writes what a run writes in its run folder, without running anything."""

    def __init__(self, cfg: object) -> None:
        self.cfg = cfg

    def run(self) -> None:
        run_dir = self.cfg.run_dir  # type: ignore[attr-defined]
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text('{"rounds": []}')
        (run_dir / "config.yaml").write_text("seed: 0\n")


def test_run_and_compare_keep_what_they_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = types.ModuleType("raypipe.pipeline")
    pipeline.Pipeline = FakePipeline  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "raypipe.pipeline", pipeline)
    monkeypatch.setattr("raypipe.cli.run_console", lambda *args: contextlib.nullcontext())
    dest = tmp_path / "kept" / "quick"
    runs = tmp_path / "runs"
    argv = ["run", "conf/quickstart.yaml", f"output_dir={runs}", "--results", str(dest)]
    assert raypipe_main(argv) == 0
    record = json.loads((dest / "record.json").read_text())
    assert record["command"] == f"raypipe run conf/quickstart.yaml output_dir={runs} --results {dest}"
    assert record["files"] == ["config.yaml", "summary.json"]
    assert (dest / "summary.json").read_text() == (runs / "quickstart" / "summary.json").read_text()

    def fake_compare(cmp: CompareConfig) -> None:
        root = Path(cmp.output_dir) / cmp.name
        root.mkdir(parents=True)
        for name in ("compare.json", "compare.md", "config.yaml"):
            (root / name).write_text(name)

    monkeypatch.setattr("raypipe.compare.run_compare", fake_compare)
    dest = tmp_path / "kept" / "cmp"
    assert raypipe_main(["compare", "conf/compare.yaml", f"output_dir={runs}", "--results", str(dest)]) == 0
    kept = json.loads((dest / "record.json").read_text())["files"]
    assert kept == ["compare.json", "compare.md", "config.yaml"]
    assert (dest / "compare.md").read_text() == "compare.md"


def test_a_realign_run_is_refused_before_it_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("raypipe.cli.run_console", lambda *args: pytest.fail("the run started"))
    dest = tmp_path / "kept"
    assert raypipe_main(["run", "conf/realign_gsm8k.yaml", "--results", str(dest)]) == 2
    assert "a realign run writes none" in capsys.readouterr().err and not dest.exists()


def test_a_comparison_config_is_kept_as_it_loads(tmp_path: Path) -> None:
    """run_compare saves its resolved config with save_config: loading that file gives the comparison back."""
    cmp = CompareConfig(name="c", seeds=[3, 4], round_steps=7, base=str(ROOT / "conf/quickstart.yaml"),
                        base_overrides=["rounds=1"],
                        arms={"dc": ArmConfig(method="aft", overrides=["aft.constraint=dc"])})
    save_config(cmp, tmp_path / "config.yaml")
    assert load_compare(tmp_path / "config.yaml") == cmp
