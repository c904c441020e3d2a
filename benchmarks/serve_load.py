"""Serving under load: a bounded load test of the Serve app on loopback.

A fixed number of completion requests from a fixed number of concurrent clients, cut off after a fixed time:
latency percentiles of the answered requests, throughput, and how many were turned away with 503 once more than
`max_ongoing_requests` + `max_queued_requests` were in flight (anything else, a 5xx or a dropped connection, is a
failure). Each concurrency level is measured against the same running app, the first level (one client) being
the baseline the others' throughput is a ratio of. Afterwards one more request checks the server still answers.

    .venv/bin/python -m benchmarks serve_load runs/quickstart --requests 64 --concurrency 1 4 16
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import requests

from raypipe.results import FIGURES_MARK

PROMPT = "Start with 5. Add 3. Multiply by 2. What is the result?\n"


@dataclass
class LoadReport:
    """What one load level measured."""

    concurrency: int
    sent: int
    seconds: float
    status: dict[str, int] = field(default_factory=dict)
    """Answers by HTTP status ('error' for a connection that failed, 'not_sent' past the time limit)."""
    latencies: list[float] = field(default_factory=list)
    """Seconds of each answered (200) request."""
    completion_tokens: int = 0

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    @property
    def failures(self) -> int:
        """Answers that are neither a result nor the documented overload answer."""
        return sum(n for code, n in self.status.items() if code not in ("200", "503", "not_sent"))

    def row(self) -> dict[str, Any]:
        ok = self.status.get("200", 0)
        return {"concurrency": self.concurrency, "sent": self.sent, "ok": ok, "503": self.status.get("503", 0),
                "failures": self.failures, "p50_s": self.percentile(0.5), "p99_s": self.percentile(0.99),
                "requests_per_s": ok / self.seconds, "tokens_per_s": self.completion_tokens / self.seconds}


def run_load(url: str, token: str | None, requests_total: int, concurrency: int, max_tokens: int,
             time_limit_s: float, model: str = "raypipe") -> LoadReport:
    """`requests_total` completions from `concurrency` clients; none is started after `time_limit_s`."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    deadline = time.perf_counter() + time_limit_s

    def one() -> tuple[str, float, int]:
        if time.perf_counter() > deadline:
            return "not_sent", 0.0, 0
        start = time.perf_counter()
        try:
            response = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=time_limit_s)
        except requests.RequestException:
            return "error", time.perf_counter() - start, 0
        tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
        return str(response.status_code), time.perf_counter() - start, tokens

    report = LoadReport(concurrency=concurrency, sent=requests_total, seconds=0.0)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in as_completed([pool.submit(one) for _ in range(requests_total)]):
            code, seconds, tokens = future.result()
            report.status[code] = report.status.get(code, 0) + 1
            if code == "200":
                report.latencies.append(seconds)
                report.completion_tokens += tokens
    report.seconds = time.perf_counter() - start
    return report


def still_serving(url: str, token: str | None, model: str = "raypipe") -> bool:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = requests.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 8},
                             headers=headers, timeout=120)
    return response.status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default="runs/quickstart",
                        help="a run folder (its latest model) or a model folder")
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=64, help="completion length (ignore_eos: exact)")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per level, at most")
    parser.add_argument("--limits", nargs="*", default=["max_ongoing_requests=4", "max_queued_requests=4"],
                        help="ServeConfig overrides of the app under test")
    args = parser.parse_args(argv)
    from ray import serve

    from raypipe.serve import start

    url = start(args.model, args.limits, port=_free_port())
    try:
        reports = [run_load(url, None, args.requests, c, args.max_tokens, args.time_limit) for c in args.concurrency]
        alive = still_serving(url, None)
    finally:
        serve.shutdown()
    rows = [r.row() for r in reports]
    print(f"\n{FIGURES_MARK}\nserve load: {args.requests} requests of {args.max_tokens} tokens per level, limits {args.limits}")
    print("| " + " | ".join(rows[0]) + " | throughput vs 1 client |")
    print("|" + "---|" * (len(rows[0]) + 1))
    for row in rows:
        ratio = row["requests_per_s"] / rows[0]["requests_per_s"] if rows[0]["requests_per_s"] else None
        print("| " + " | ".join(_fmt(v) for v in row.values()) + f" | {_fmt(ratio)} |")
    print(f"answers after the load: {'yes' if alive else 'NO'}; median latency at 1 client "
          f"{_fmt(statistics.median(reports[0].latencies)) if reports[0].latencies else '-'} s")


if __name__ == "__main__":
    main()
