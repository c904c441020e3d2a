"""`python -m raypipe.render_results [--check]` (`make results`): the docs' figures from the kept results.

A generated block in README.md or benchmarks/RESULTS.md is

    <!-- results: quickstart run -->
    ...
    <!-- /results -->

naming a folder under results/ (written by a command's `--results`: raypipe.results) and a renderer
(RENDERERS). Every block is rewritten from its folder, so a figure in the docs is the kept file's;
`--check` (the docs test) lists the blocks that differ from their folders instead of writing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from raypipe.report import format_figure
from raypipe.results import FIGURES_MARK, RECORD_FILE, REPO, RESULTS_DIR

DOCS = ("README.md", "benchmarks/RESULTS.md")
"""The documents whose blocks `make results` renders, relative to the repository."""
OPEN = re.compile(r"<!-- results: (\S+) (\S+) -->")
CLOSE = "<!-- /results -->"
RUN_COLUMNS = ("accuracy_before", "accuracy_after", "control_accuracy_after", "n_pairs", "train_steps")
"""A run's per-round figures in the docs; `n_pairs` is `n_train_rows` for a method that builds no pairs."""
WARMUP_EVALS = 5
"""The warm-up's last dev evaluations a run's block shows: enough to see whether it had flattened."""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ResultsError(Exception):
    """A block that cannot be rendered: the message says which and why."""


def render_run(folder: Path) -> str:
    """A run's summary.json: one row per round, and the warm-up SFT it started from where it ran one."""
    summary = _json(folder / "summary.json")
    rounds = summary["rounds"]
    columns = [c if c != "n_pairs" or any(r["n_pairs"] is not None for r in rounds) else "n_train_rows"
               for c in RUN_COLUMNS]
    lines = ["| round | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {r['round']} | " + " | ".join(format_figure(r[c]) for c in columns) + " |" for r in rounds]
    if summary.get("warmup"):
        lines += ["", _warmup_line(summary["warmup"])]
    return "\n".join(lines)


def _warmup_line(warmup: dict[str, Any]) -> str:
    """Where on its learning curve the round started: SFT's length, stop and last dev evaluations."""
    curve = list(warmup["dev_accuracy"].items())[-WARMUP_EVALS:]
    return (f"Warm-up SFT: {warmup['steps']} steps (stopped: {warmup['stop_reason']}), final training loss "
            f"{warmup['final_loss']:.4f}; dev accuracy at steps "
            + ", ".join(f"{step}: {accuracy:.3f}" for step, accuracy in curve) + ".")


def render_compare(folder: Path) -> str:
    """A comparison's compare.json, as `raypipe compare` prints it."""
    from raypipe.compare import markdown_table  # compare imports Ray: only when a doc has a comparison

    return markdown_table(_json(folder / "compare.json"))


def render_bench(folder: Path) -> str:
    """A benchmark's closing figures (what follows its last FIGURES_MARK line; the whole output without one) as
    the terminal showed them: colour codes dropped, a line redrawn with a carriage return (a progress bar) shown
    as last drawn."""
    text = ANSI.sub("", _read(folder / "output.txt"))
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1].rstrip() for line in text.strip("\n").split("\n")]
    if FIGURES_MARK in lines:
        lines = lines[len(lines) - lines[::-1].index(FIGURES_MARK):]
        while lines and not lines[0]:
            lines.pop(0)
    fence = "`" * max([3, *(len(run) + 1 for run in re.findall(r"`+", text))])  # longer than any run inside
    return "\n".join([fence + "text", *lines, fence])


RENDERERS: dict[str, Callable[[Path], str]] = {"run": render_run, "compare": render_compare,
                                               "bench": render_bench}
"""Renderer kind (the marker's second word) -> the markdown of a result folder's figures."""


def provenance(record: dict[str, Any]) -> str:
    """The line under every block: when, from which code, how long, where, and the command that wrote it."""
    commit = record["git_commit"]
    code = (f"commit {commit[:7]}{' with uncommitted changes' if record['git_dirty'] else ''}" if commit
            else "code outside git")
    return (f"Run on {record['date'][:10]} at {code}, {_duration(record['wall_seconds'])} on "
            f"{_machine(record['machine'])}; `{record['command']}`")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def _machine(machine: dict[str, Any]) -> str:
    parts = [f"{machine['cores']} CPU cores ({machine['cpu']})"]
    if machine["memory_gib"] is not None:
        parts.append(f"{machine['memory_gib']:.0f} GiB RAM")
    gpus = machine["gpus"] or []
    parts.append(", ".join(f"{gpus.count(name)}x {name}" for name in dict.fromkeys(gpus)) or "no GPU")
    return ", ".join(parts)


def render_block(results: Path, name: str, kind: str) -> str:
    """The text between a block's markers: the figures of `results/<name>` and their provenance line."""
    if kind not in RENDERERS:
        raise ResultsError(f"unknown kind {kind!r} (known: {', '.join(RENDERERS)})")
    if ".." in Path(name).parts or Path(name).is_absolute():
        raise ResultsError(f"{name!r} is not a folder under {RESULTS_DIR}/")
    folder = results / name
    if not folder.is_dir():
        raise ResultsError(f"{_shown(folder)}: no such folder")
    record = _json(folder / RECORD_FILE)
    return f"\n{RENDERERS[kind](folder).rstrip()}\n\n{provenance(record)}\n\n"


def render(text: str, results: Path, doc: str) -> tuple[str, list[str], list[str]]:
    """`text` with every block rendered from `results`; the blocks that changed and the ones that could not be
    rendered (kept as they were), one `doc:line: ...` message each."""
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    changed: list[str] = []
    errors: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        out.append(lines[i])
        i += 1
        if line == CLOSE:
            errors.append(f"{doc}:{i}: {CLOSE} with no opening marker before it")
        found = OPEN.fullmatch(line)
        if not found:
            continue
        end = next((j for j in range(i, len(lines))
                    if lines[j].strip() == CLOSE or OPEN.fullmatch(lines[j].strip())), None)
        if end is None or lines[end].strip() != CLOSE:
            errors.append(f"{doc}:{i}: {line} has no {CLOSE} before the next block or the end")
            continue
        name, kind = found.groups()
        old = "".join(lines[i:end])
        try:
            new = render_block(results, name, kind)
        except (ResultsError, OSError, KeyError, ValueError) as err:  # a kept file unreadable or not as kept
            reason = err if isinstance(err, ResultsError) else f"{type(err).__name__}: {err}"
            errors.append(f"{doc}:{i}: block '{name} {kind}': {reason}")
            new = old
        if new != old:
            changed.append(f"{doc}:{i}: block '{name} {kind}' differs from {_shown(results / name)} (edited "
                           "by hand, or the results changed since the last `make results`)")
        out += [new, lines[end]]
        i = end + 1
    return "".join(out), changed, errors


def _json(path: Path) -> dict[str, Any]:
    return json.loads(_read(path))


def _read(path: Path) -> str:
    """A kept file's text as written: carriage returns kept (read_text would make them line ends), a byte
    that is not UTF-8 replaced."""
    if not path.is_file():
        raise ResultsError(f"{_shown(path)}: missing")
    return path.read_bytes().decode(errors="replace")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raypipe.render_results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("docs", nargs="*", type=Path, default=[REPO / d for d in DOCS],
                        help=f"documents to render (default: {', '.join(DOCS)})")
    parser.add_argument("--results", type=Path, default=REPO / RESULTS_DIR, help="the kept results' folder")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 listing every block that differs from its folder")
    args = parser.parse_args(argv)
    problems: list[str] = []
    for doc in args.docs:
        text = doc.read_text()
        new, changed, errors = render(text, args.results, _shown(doc))
        problems += errors + (changed if args.check else [])
        if not args.check and new != text:
            doc.write_text(new)
            print(f"{_shown(doc)}: {len(changed)} block(s) rendered anew")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems and args.check:
        print("run `make results` to render the docs from results/", file=sys.stderr)
    return 1 if problems else 0


def _shown(path: Path) -> str:
    """A path in messages: relative to the repository where it is in it."""
    resolved = path.resolve()
    return str(resolved.relative_to(REPO)) if resolved.is_relative_to(REPO) else str(path)


if __name__ == "__main__":
    sys.exit(main())
