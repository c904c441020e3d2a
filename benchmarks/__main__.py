"""`python -m benchmarks <name> [args]` runs one benchmark; `python -m benchmarks all` runs every one, each at its
default settings, which are the ones benchmarks/RESULTS.md reports (`make bench` does this).

Modules are imported only when run, so one benchmark's missing module or optional peer (TRL) stops only that one.
`python -m benchmarks --results DIR <name> [args]` keeps what the terminal shows in DIR/output.txt, with
record.json (command, git commit, machine, date, wall time; raypipe.results) once the benchmark succeeds.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from raypipe.results import begin, keep

BENCHMARKS = {
    "train_throughput": "SFT: run_training (Ray Train + DeepSpeed) vs a plain torch loop",
    "dpo_vs_trl": "DPO: raypipe vs TRL's DPOTrainer, precomputed vs live reference log-probs",
    "sampling": "sampling throughput",
    "branching": "step-level branching",
    "end_to_end": "one pipeline round end to end",
    "serve_load": "serving under load: the Serve app on a trained run (runs/quickstart: `make demo` first)",
}
"""Name (module under benchmarks/) -> what it measures."""


def load(name: str) -> ModuleType:
    """The benchmark's module; a clear error when it is not there."""
    try:
        return importlib.import_module(f"benchmarks.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"benchmarks.{name}":
            raise
        raise SystemExit(f"benchmark {name!r} has no module benchmarks/{name}.py") from None


def run_teed(command: Sequence[str], path: Path) -> int:
    """Run `command`, passing its stdout and stderr (and those of its own children: spawned contenders, Ray
    workers) on to the terminal and into `path`, so the file is what the terminal showed; its exit status. A
    child process rather than a redirection of this one: the pipe ends once the benchmark has exited, Ray's
    shutdown at exit included."""
    with path.open("wb") as out, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                  env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(1 << 16):
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            out.write(chunk)
    return proc.returncode


def main(argv: list[str] | None = None) -> None:
    listing = "\n".join(f"  {name:<17} {what}" for name, what in BENCHMARKS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__, epilog=f"benchmarks:\n{listing}\n\n`python -m benchmarks <name> --help` for its options")
    parser.add_argument("--results", type=Path, default=None,
                        help="keep the output in DIR/output.txt with record.json (goes before the name)")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.name == "all" and args.args:
        parser.error("`all` runs every benchmark at its defaults and takes no arguments")
    if args.results is not None:
        start = begin(args.results, "python -m benchmarks", argv)
        output = args.results / "output.txt"
        status = run_teed([sys.executable, "-m", "benchmarks", args.name, *args.args], output)
        if status:
            raise SystemExit(status)
        keep(start, [output])
        return
    if args.name != "all":
        load(args.name).main(args.args)
        return
    modules = {name: load(name) for name in BENCHMARKS}  # every module present before hours of measuring
    for name, module in modules.items():
        print(f"\n=== {name}: {BENCHMARKS[name]} ({time.strftime('%Y-%m-%d %H:%M')}) ===", flush=True)
        module.main([])


if __name__ == "__main__":
    main(sys.argv[1:])
