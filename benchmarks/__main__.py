"""`python -m benchmarks <name> [args]` runs one benchmark; `python -m benchmarks all` runs every one, each at its
default settings, which are the ones benchmarks/RESULTS.md reports (`make bench` does this).

Modules are imported only when run, so one benchmark's missing module or optional peer (TRL) stops only that one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from types import ModuleType

BENCHMARKS = {
    "train_throughput": "SFT: run_training (Ray Train + DeepSpeed) vs a plain torch loop",
    "dpo_vs_trl": "DPO: raypipe vs TRL's DPOTrainer, precomputed vs live reference log-probs",
    "sampling": "sampling throughput",
    "branching": "step-level branching",
    "end_to_end": "one pipeline round end to end",
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


def main(argv: list[str] | None = None) -> None:
    listing = "\n".join(f"  {name:<17} {what}" for name, what in BENCHMARKS.items())
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__, epilog=f"benchmarks:\n{listing}\n\n`python -m benchmarks <name> --help` for its options")
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to the benchmark")
    args = parser.parse_args(argv)
    if args.name != "all":
        load(args.name).main(args.args)
        return
    if args.args:
        parser.error("`all` runs every benchmark at its defaults and takes no arguments")
    modules = {name: load(name) for name in BENCHMARKS}  # every module present before hours of measuring
    for name, module in modules.items():
        print(f"\n=== {name}: {BENCHMARKS[name]} ({time.strftime('%Y-%m-%d %H:%M')}) ===", flush=True)
        module.main([])


if __name__ == "__main__":
    main(sys.argv[1:])
