"""What a person sees while a run goes: raypipe's own lines and one progress line per stage on the
terminal, with everything the libraries print (Ray workers, vLLM, DeepSpeed, transformers, Ray Data, Python
warnings, native code's stderr) in the run's `logs/console.log` instead. `--verbose` shows it all too.

Without `run_console` (tests, Python callers) nothing is redirected: `terminal()` is a plain console on stdout
and `stage_progress` does nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

LOG_FILE = "console.log"
WIDTH = 100
"""Widest line raypipe prints itself (tables included)."""


@dataclass
class _Active:
    out: Console
    """raypipe's output (summaries), on the real stdout."""
    err: Console
    """raypipe's log lines and the stage progress, on the real stderr."""


_active: _Active | None = None


def terminal() -> Console:
    """Where raypipe prints what a user reads (summary tables): the real stdout even while library output is
    redirected to the log file."""
    return _active.out if _active is not None else Console(width=WIDTH)


class _ConsoleHandler(logging.Handler):
    """One short line per record (`12:01:07 run round_1/sample`), printed through the rich console so that it
    lands above a running spinner instead of through it."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {level}{record.getMessage()}"
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


class _OwnLines(logging.Filter):
    """raypipe's records, and errors from anyone."""

    def filter(self, record: logging.LogRecord) -> bool:
        own = record.name.split(".")[0] in ("raypipe", "serving", "__main__")
        return own or record.levelno >= logging.ERROR


@contextmanager
def run_console(logs_dir: Path, verbose: bool = False) -> Iterator[Path]:
    """Route the process's output for one command: every log record and (unless `verbose`) all of stdout and
    stderr into `logs_dir/console.log`; raypipe's lines to the terminal. Yields the log file's path."""
    global _active
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / LOG_FILE
    real_out, real_err = sys.stdout, sys.stderr
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    with (path.open("a", buffering=1, encoding="utf-8") as log_file,
          _native_stderr_to(log_file, not verbose) as shown):
        terminal_err = shown or real_err
        err = Console(file=terminal_err, width=min(WIDTH, Console(file=terminal_err).width))
        _active = _Active(out=Console(file=real_out, width=WIDTH), err=err)
        to_file = logging.StreamHandler(log_file)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        to_terminal = _ConsoleHandler(err)
        if not verbose:
            to_terminal.addFilter(_OwnLines())
        to_file.setLevel(logging.INFO)
        root.handlers = [to_file, to_terminal]
        root.setLevel(logging.INFO)
        logging.captureWarnings(True)
        rerouted = _reroute_library_loggers()
        if not verbose:
            sys.stdout = sys.stderr = log_file
            _quiet_ray_data()
        ray_before = _ray_connected()
        try:
            yield path
        finally:
            if not ray_before and _ray_connected():  # a session this command started: end it while routed
                sys.modules["ray"].shutdown()
            sys.stdout, sys.stderr = real_out, real_err
            root.handlers, _active = saved_handlers, None
            root.setLevel(saved_level)
            logging.captureWarnings(False)
            for logger, handlers in rerouted:
                logger.handlers, logger.propagate = handlers, False


@contextmanager
def _native_stderr_to(log_file: TextIO, redirect: bool) -> Iterator[TextIO | None]:
    """Point file descriptor 2 at the log file, for what native code writes there directly (Ray's core
    worker in the driver logs this way, past any Python stream); yields a stream on the terminal's stderr for
    raypipe's own lines, or None when nothing was redirected (`--verbose`, or stderr is not the process's: a
    test capturing it)."""
    if not redirect or not _is_fd(sys.stderr, 2):
        yield None
        return
    sys.stderr.flush()
    terminal_fd = os.dup(2)
    os.dup2(log_file.fileno(), 2)
    try:
        with os.fdopen(os.dup(terminal_fd), "w", buffering=1, encoding="utf-8") as shown:
            yield shown
    finally:
        os.dup2(terminal_fd, 2)
        os.close(terminal_fd)


def _is_fd(stream: TextIO, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # a test's capture buffer has none
        return False


def _reroute_library_loggers() -> list[tuple[logging.Logger, list[logging.Handler]]]:
    """Ray gives its loggers ('ray', 'ray.data') their own terminal handlers and stops them propagating, so
    their lines would bypass both the filter and the log file: for the command's duration they drop their
    terminal handlers and propagate to ours. Returns what to put back."""
    import ray.data  # noqa: F401  (configures Ray Data's logger now, so it is rerouted too)

    rerouted = []
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger) and not logger.propagate:
            rerouted.append((logger, logger.handlers[:]))
            logger.handlers = [h for h in logger.handlers if isinstance(h, logging.FileHandler)
                               or not isinstance(h, logging.StreamHandler)]
            logger.propagate = True
    return rerouted


def _ray_connected() -> bool:
    """Whether this process has a Ray session. The command ends one it started before the routing ends: Ray's
    log thread relays the workers' last lines until the session ends, and would print them on the terminal."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _quiet_ray_data() -> None:
    """Ray Data's own progress lines would interleave with the stage lines; the stage line stands for them."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


@contextmanager
def stage_progress(label: str) -> Iterator[None]:
    """A spinner with the elapsed time while the stage runs, then one line saying how long it took."""
    if _active is None:
        yield
        return
    start = time.perf_counter()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    # on a log file or in CI no spinner: the closing line says it all
    shown = _active.err.is_terminal
    spinner = Progress(*columns, console=_active.err, transient=True) if shown else nullcontext()
    try:
        with spinner as progress:
            if progress is not None:
                progress.add_task(label, total=None)
            yield
    except BaseException:
        _active.err.print(f"[red]x[/] {label} failed after {time.perf_counter() - start:.1f} s")
        raise
    _active.err.print(f"[green]done[/] {label} [dim]{time.perf_counter() - start:.1f} s[/]")
