"""The console a person reads: raypipe's lines on the terminal, the libraries' output in the run's log file, and a
summary that fits 100 columns."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from raypipe.console import LOG_FILE, WIDTH, run_console, stage_progress
from raypipe.report import SUMMARY_COLUMNS, print_summary


def _noise() -> None:
    """What the libraries do: print, warn, log at WARNING under their own names."""
    print("vLLM engine started with 42 blocks")
    warnings.warn("TypedStorage is deprecated", UserWarning, stacklevel=1)
    logging.getLogger("ray.data").warning("Progress bars disabled")


def test_library_output_goes_to_the_log_and_raypipe_lines_to_the_terminal(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with run_console(tmp_path / "logs") as log_path:
        _noise()
        logging.getLogger("raypipe.pipeline").info("round 1 of 2")
        logging.getLogger("deepspeed").error("NCCL timeout")
        with stage_progress("round_1/sample"):
            pass
    shown = capsys.readouterr()
    terminal = shown.out + shown.err
    assert "round 1 of 2" in terminal and "NCCL timeout" in terminal  # raypipe's lines, and errors from anyone
    assert "done round_1/sample" in terminal
    for noise in ("vLLM engine started", "TypedStorage", "Progress bars disabled"):
        assert noise not in terminal
    assert log_path == tmp_path / "logs" / LOG_FILE
    logged = log_path.read_text()
    for line in ("vLLM engine started", "TypedStorage", "Progress bars disabled", "round 1 of 2", "NCCL timeout"):
        assert line in logged
    print("after the run")  # everything is put back
    assert capsys.readouterr().out == "after the run\n"


def test_verbose_shows_everything_and_still_logs_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with run_console(tmp_path / "logs", verbose=True) as log_path:
        _noise()
    shown = capsys.readouterr()
    terminal = shown.out + shown.err
    for noise in ("vLLM engine started", "TypedStorage", "Progress bars disabled"):
        assert noise in terminal
    assert "Progress bars disabled" in log_path.read_text()


def test_a_failed_stage_says_so_and_the_error_propagates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(RuntimeError, match="boom"), run_console(tmp_path / "logs"), stage_progress("round_2/train"):
        raise RuntimeError("boom")
    assert "round_2/train failed after" in capsys.readouterr().err


def test_summary_fits_100_columns_and_names_every_figure(capsys: pytest.CaptureFixture) -> None:
    row = {c: 0.123456 for c in SUMMARY_COLUMNS} | {"n_pairs": 720, "corrections_kept": None,
                                                   "correction_pass_rate": None}
    rounds = [row | {"round": r, "method": "stepdpo",
                     "stage_seconds": {"sample": 31.25, "branch": 120.5, "train": 80.0}} for r in (1, 2, 3)]
    print_summary({"run": "quickstart", "method": "stepdpo", "rounds": rounds})
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= WIDTH
    assert "…" not in out
    for figure in set(SUMMARY_COLUMNS) - {"corrections_kept", "correction_pass_rate"}:
        assert figure in out
    assert "corrections_kept" not in out  # no round has it: left out
    assert "round 3" in out and "0.123" in out and "720" in out and "120.5" in out


def test_native_writes_to_stderr_go_to_the_log_too(tmp_path: Path) -> None:
    """What native code writes to file descriptor 2 (Ray's core worker in the driver) bypasses Python's streams;
    in a process of its own, as the CLI runs, it lands in the log file and raypipe's lines on the terminal."""
    import os
    import subprocess
    import sys

    script = ("import logging, os, sys\nfrom pathlib import Path\nfrom raypipe.console import run_console\n"
              f"with run_console(Path({str(tmp_path)!r})):\n"
              "    os.write(2, b'core_worker.cc: native noise\\n')\n"
              "    logging.getLogger('raypipe.pipeline').info('round 1 of 1')\n"
              "os.write(2, b'after\\n')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "round 1 of 1" in done.stderr and "native noise" not in done.stderr + done.stdout
    assert done.stderr.rstrip().endswith("after"), "fd 2 is the terminal's again afterwards"
    assert "native noise" in (tmp_path / LOG_FILE).read_text()
