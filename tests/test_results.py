"""Kept results: record.json (command, commit, machine, date, wall time), `--results` on `raypipe run` and
`raypipe compare`, the docs' generated blocks, and the docs equal to the rendering of results/."""

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
from raypipe.compare import ArmConfig, CompareConfig, load_compare, markdown_table
from raypipe.config import save_config
from raypipe.render_results import main as render_main
from raypipe.results import FIGURES_MARK, begin, git_state, keep, machine

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


RECORD = {"command": "raypipe run conf/quickstart.yaml --results results/quick",
          "git_commit": "09588e7c66d8433945f47556f179e594856843dd", "git_dirty": False,
          "date": "2026-12-03T16:54:09+00:00", "wall_seconds": 1116.0,
          "machine": {"cpu": "Intel(R) Xeon(R) Processor", "cores": 2, "memory_gib": 23.5, "gpus": None,
                      "python": "3.11.7", "libraries": {"torch": "2.13.0+cpu"}},
          "files": ["config.yaml", "summary.json"]}
"""A record as `keep` writes it, with fixed values so that the rendering can be spelled out."""



def write_result(folder: Path, files: dict[str, str], **record: object) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / "record.json").write_text(json.dumps({**RECORD, **record}))
    return folder


def round_row(r: int, before: float, after: float, control: float | None, pairs: int | None, rows: int,
              steps: int) -> dict:
    return {"round": r, "method": "stepdpo", "accuracy_before": before, "accuracy_after": after,
            "control_accuracy_after": control, "n_pairs": pairs, "n_train_rows": rows, "train_steps": steps,
            "stage_seconds": {"train": 1.0}}


COMPARE = {"name": "cmp", "seeds": [0, 1], "round_steps": 4, "rows": {
    "start (SFT checkpoint)": {"accuracy": {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 2,
                                            "values": [0.5, 0.5]}},
    "dpo": {"method": "dpo", "round": 1, "accuracy": {"mean": 0.61, "low": 0.48, "high": 0.74, "n": 2,
                                                       "values": [0.6, 0.62]},
            "control_accuracy": 0.7, "train_rows": 12.0, "train_steps": 4.0, "assessment_before": 0.6,
            "assessment_after": 0.65, "rollouts_per_pair": None, "seconds": 3.0}}, "runs": []}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Two kept results: a two-round run and a comparison (code with uncommitted changes, on two GPUs)."""
    root = tmp_path / "results"
    warmup = {"steps": 1500, "stop_reason": "max_steps", "final_loss": 0.00046,
              "dev_accuracy": {str(100 * k): 0.1 * k for k in range(1, 8)}}
    write_result(root / "quick", {"summary.json": json.dumps({"run": "quick", "method": "stepdpo", "warmup": warmup,
                                                              "rounds": [round_row(1, 0.48, 0.562, 0.656, 720, 720, 46),
                                                                         round_row(2, 0.562, 0.6, None, 650, 650, 40)]})})
    write_result(root / "cmp", {"compare.json": json.dumps(COMPARE)}, git_commit="abcdef1234" + "0" * 30,
                 git_dirty=True, wall_seconds=8280.0, command="raypipe compare conf/compare.yaml --results x",
                 machine={"cpu": "AMD EPYC", "cores": 16, "memory_gib": 128.0, "gpus": ["NVIDIA H200"] * 2,
                          "python": "3.11.7", "libraries": {}})
    return root


RENDERED_RUN = """<!-- results: quick run -->

| round | accuracy_before | accuracy_after | control_accuracy_after | n_pairs | train_steps |
|---|---|---|---|---|---|
| 1 | 0.480 | 0.562 | 0.656 | 720 | 46 |
| 2 | 0.562 | 0.600 | - | 650 | 40 |

Warm-up SFT: 1500 steps (stopped: max_steps), final training loss 0.0005; dev accuracy at steps 300: 0.300, 400: 0.400, 500: 0.500, 600: 0.600, 700: 0.700.

Run on 2026-12-03 at commit 09588e7, 18.6 min on 2 CPU cores (Intel(R) Xeon(R) Processor), 24 GiB RAM, \
no GPU; `raypipe run conf/quickstart.yaml --results results/quick`

<!-- /results -->
"""


def rendered_compare() -> str:
    return (f"<!-- results: cmp compare -->\n\n{markdown_table(COMPARE)}\nRun on 2026-12-03 at commit "
            "abcdef1 with uncommitted changes, 2.3 h on 16 CPU cores (AMD EPYC), 128 GiB RAM, "
            "2x NVIDIA H200; `raypipe compare conf/compare.yaml --results x`\n\n<!-- /results -->\n")


def test_a_doc_renders_every_block_from_its_folder(results: Path, tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Figures\n\n<!-- results: quick run -->\nan old table\n<!-- /results -->\n\nBetween.\n"
                   "<!-- results: cmp compare -->\n<!-- /results -->\nThe end.\n")
    assert render_main([str(doc), "--results", str(results)]) == 0
    assert doc.read_text() == f"# Figures\n\n{RENDERED_RUN}\nBetween.\n{rendered_compare()}The end.\n"
    assert render_main([str(doc), "--results", str(results), "--check"]) == 0


def test_a_method_without_pairs_shows_training_rows_and_a_benchmark_its_output(tmp_path: Path) -> None:
    results = tmp_path / "results"
    sft = round_row(1, 0.5, 0.55, None, None, 900, 30)
    write_result(results / "sft", {"summary.json": json.dumps({"rounds": [sft]})})
    write_result(results / "bench" / "dpo", {"output.txt": "\x1b[36m(Worker pid=1)\x1b[0m step 1\n"
                 "Loading:   0%|   | 0/39\rLoading: 100%|###| 39/39\n| a | b |\nsee ```code```\n"})
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results: sft run -->\n<!-- /results -->\n<!-- results: bench/dpo bench -->\n"
                   "<!-- /results -->\n")
    assert render_main([str(doc), "--results", str(results)]) == 0
    text = doc.read_text()
    assert ("| round | accuracy_before | accuracy_after | control_accuracy_after | n_train_rows | "
            "train_steps |\n|---|---|---|---|---|---|\n| 1 | 0.500 | 0.550 | - | 900 | 30 |\n") in text
    assert ("\n````text\n(Worker pid=1) step 1\nLoading: 100%|###| 39/39\n| a | b |\nsee ```code```\n"
            "````\n") in text


def test_a_benchmark_block_shows_what_follows_its_last_figures_mark(tmp_path: Path) -> None:
    results = tmp_path / "results"
    write_result(results / "bench" / "b", {"output.txt": f"(Worker pid=1) step 1\n{FIGURES_MARK}\nstale\n"
                                                        f"{FIGURES_MARK}\n\n| a | b |\nratio 1.2x\n"})
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- results: bench/b bench -->\n<!-- /results -->\n")
    assert render_main([str(doc), "--results", str(results)]) == 0
    assert "\n```text\n| a | b |\nratio 1.2x\n```\n" in doc.read_text()


def test_check_names_a_hand_edited_block_and_writes_nothing(results: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("Intro.\n<!-- results: quick run -->\n<!-- /results -->\n")
    assert render_main([str(doc), "--results", str(results)]) == 0
    edited = doc.read_text().replace("| 0.562 | 0.656 |", "| 0.600 | 0.656 |")
    doc.write_text(edited)
    capsys.readouterr()
    assert render_main([str(doc), "--results", str(results), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{doc}:2: block 'quick run' differs from {results / 'quick'}" in err and "make results" in err
    assert doc.read_text() == edited
    assert render_main([str(doc), "--results", str(results)]) == 0
    assert doc.read_text() == "Intro.\n" + RENDERED_RUN


def test_check_names_every_block_it_cannot_render(results: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    (results / "unkept").mkdir()
    doc = tmp_path / "doc.md"
    text = ("<!-- results: missing run -->\nkept as it was\n<!-- /results -->\n"  # 1
            "<!-- results: quick table -->\n<!-- /results -->\n"  # 4
            "<!-- results: ../quick run -->\n<!-- /results -->\n"  # 6
            "<!-- results: unkept run -->\n<!-- /results -->\n"  # 8
            "<!-- /results -->\n"  # 10
            "<!-- results: quick run -->\nno end\n")  # 11
    doc.write_text(text)
    for check in ([], ["--check"]):
        assert render_main([str(doc), "--results", str(results), *check]) == 1
        err = capsys.readouterr().err
        assert f"{doc}:1: block 'missing run': {results / 'missing'}: no such folder" in err
        assert f"{doc}:4: block 'quick table': unknown kind 'table' (known: run, compare, bench)" in err
        assert f"{doc}:6: block '../quick run': '../quick' is not a folder under results/" in err
        assert f"{doc}:8: block 'unkept run': {results / 'unkept' / 'record.json'}: missing" in err
        assert f"{doc}:10: <!-- /results --> with no opening marker before it" in err
        assert f"{doc}:11: <!-- results: quick run --> has no <!-- /results -->" in err
        assert doc.read_text() == text


def test_the_docs_equal_the_rendering_of_results(capsys: pytest.CaptureFixture[str]) -> None:
    """README.md and benchmarks/RESULTS.md render to themselves: a figure edited by hand, or a kept result
    changed without `make results`, fails here."""
    assert render_main(["--check"]) == 0, capsys.readouterr().err
