"""Paired accuracy differences: two models graded on the same test problems, compared problem by problem.

A difference of 1-2 points on a few hundred problems is inside the noise of either accuracy alone, but most
problems are answered the same way by both models, so the per-problem difference has a far smaller spread. The
interval is a paired bootstrap over problems: a problem is the unit that is resampled, and with several seeds each
problem's difference is first averaged over the seeds, so the interval covers problem sampling and the seeds'
training noise as far as those seeds show it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raypipe.artifacts import read_rows

Verdicts = Mapping[str, bool]
"""Problem id -> graded correct, one model's evaluation."""

RESAMPLES = 10_000


def read_verdicts(evaluation_dir: str | Path) -> dict[str, bool]:
    """Problem id -> correct, from an evaluation stage's rows."""
    return {str(row["qid"]): bool(row["correct"]) for row in read_rows(Path(evaluation_dir))}


def paired_difference(pairs: Sequence[tuple[Verdicts, Verdicts]], resamples: int = RESAMPLES,
                      seed: int = 0) -> dict[str, Any]:
    """Accuracy of `a` minus accuracy of `b` over (a, b) evaluations (one pair per seed) on the same problems.

    Returns the mean difference, its 95% paired-bootstrap interval (`ci95`, percentiles), each seed's
    difference, the number of problems, and per seed how many problems only `a` or only `b` got right (McNemar's
    discordant counts: everything else is answered alike)."""
    if not pairs:
        raise ValueError("paired_difference needs at least one (a, b) pair of evaluations")
    problems = sorted(set(pairs[0][0]))
    for a, b in pairs:
        if set(a) != set(problems) or set(b) != set(problems):
            raise ValueError("paired evaluations must grade the same problems (the test split changed between them)")
    diff = np.array([[int(a[p]) - int(b[p]) for p in problems] for a, b in pairs], dtype=np.float64)
    per_problem = diff.mean(axis=0)
    rng = np.random.default_rng(seed)
    boot = per_problem[rng.integers(0, len(problems), size=(resamples, len(problems)))].mean(axis=1)
    low, high = np.quantile(boot, [0.025, 0.975])
    return {"mean": float(per_problem.mean()), "ci95": [float(low), float(high)],
            "per_seed": [float(d) for d in diff.mean(axis=1)], "n_problems": len(problems),
            "only_a_right": [int((d > 0).sum()) for d in diff], "only_b_right": [int((d < 0).sum()) for d in diff]}
