"""`python -m tests.held_driver ROUND/STAGE raypipe-args...`: the raypipe CLI, except that the named stage stops
after its body has written its output and before its manifest is committed, until the process is killed.

test_resume kills the driver while each stage is in progress. A stage such as grade runs in a few milliseconds,
so without the hold a poll from outside can miss it; with it, every stage is certain to be seen with its output
on disk and no manifest, the state a crash at the worst moment leaves. Everything else is the real CLI.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raypipe import artifacts, cli

HELD_MARKER = "held.test"
"""Written into the held stage's folder once its body has finished."""


def _hold_stage(label: str) -> None:
    run_stage = artifacts.ArtifactStore.run

    def run(self: artifacts.ArtifactStore, round_idx: int, name: str, config: Any, inputs: Any,
            body: Callable[[Path], dict[str, Any]], keep: str | None = None) -> artifacts.StageResult:
        if f"round_{round_idx}/{name}" != label:
            return run_stage(self, round_idx, name, config, inputs, body, keep)

        def held_body(out: Path) -> dict[str, Any]:
            body(out)
            (out / HELD_MARKER).touch()
            while True:
                time.sleep(1)

        return run_stage(self, round_idx, name, config, inputs, held_body, keep)

    artifacts.ArtifactStore.run = run  # type: ignore[method-assign]


if __name__ == "__main__":
    _hold_stage(sys.argv[1])
    sys.exit(cli.main(sys.argv[2:]))
