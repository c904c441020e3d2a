"""Private Ray clusters on this machine for the tests: a head (`ray start --head --block`) and worker nodes on
127.0.0.1, each with ports chosen here and a temp dir of its own, so they never meet another Ray instance on the
machine (this session's `ray.init()` cluster, a colleague's, or the default `/tmp/ray`, whose
`ray_current_cluster` file a later bare `ray.init()` would attach to). Nodes are stopped by terminating their
`ray start --block` processes: `ray stop` would kill every Ray process on the machine."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

RAY_CLI = str(Path(sys.executable).with_name("ray"))
WORKER_PORTS = 200
"""Size of each node's worker port range (one port per live worker process; a mini run peaks far below)."""


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that are free now (bound together, so the OS hands out different ones)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def free_port_range(size: int) -> int:
    """The first of `size` free consecutive ports, between Ray's default worker ports (10002-19999) and the
    kernel's ephemeral range (32768 up), so neither another cluster's workers nor bound sockets take them."""
    for _ in range(100):
        first = random.randrange(20_000, 32_000 - size)
        if all(is_free(p) for p in range(first, first + size)):
            return first
    raise RuntimeError(f"no {size} consecutive free ports between 20000 and 32000")


@dataclass
class Head:
    """A running private head: its job API address and the environment CLI calls against it need."""

    address: str
    env: dict[str, str]
    temp_dir: Path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([RAY_CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout)


def processes_under(temp_dir: Path) -> list[int]:
    """Pids of live processes whose command line names `temp_dir` (every process of a head started with it)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(temp_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def node_ports() -> list[str]:
    """`ray start` options giving a node its own free ports (several nodes share this machine)."""
    agent_http, agent_grpc, metrics, runtime_env, node_manager, objects = free_ports(6)
    first_worker = free_port_range(WORKER_PORTS)
    return ["--node-ip-address", "127.0.0.1", "--dashboard-agent-listen-port", str(agent_http),
            "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
            "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_manager),
            "--object-manager-port", str(objects), "--min-worker-port", str(first_worker),
            "--max-worker-port", str(first_worker + WORKER_PORTS - 1), "--num-gpus", "0", "--disable-usage-stats"]


def start_node(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with log_path.open("w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


@contextmanager
def ray_head(env: dict[str, str], head_args: tuple[str, ...] = ("--num-cpus", "8"),
             workers: tuple[tuple[str, ...], ...] = ()) -> Iterator[Head]:
    """`ray start --head --block` on 127.0.0.1 with explicit ports and a fresh temp dir, plus one worker node
    (`ray start --address ... --block`, its own ports and temp dir) per entry of `workers`, each entry that
    node's resource options; all torn down with SIGTERM.

    Short temp dirs under the system one, not tmp_path: Ray's Unix socket paths live in them (limit 107 bytes).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="raypipe-head-"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | env
    gcs, dashboard, client = free_ports(3)
    command = [RAY_CLI, "start", "--head", "--block", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client), "--temp-dir",
               str(temp_dir), *node_ports(), *head_args]
    log_path = temp_dir / "ray-start.log"
    process = start_node(command, env, log_path)
    head = Head(f"http://127.0.0.1:{dashboard}", env, temp_dir)
    nodes: list[tuple[subprocess.Popen, Path]] = []
    try:
        wait_for_job_api(head, process, log_path)
        for resources in workers:
            node_dir = Path(tempfile.mkdtemp(prefix="raypipe-node-"))
            node = start_node([RAY_CLI, "start", "--block", "--address", f"127.0.0.1:{gcs}", "--temp-dir",
                               str(node_dir), *node_ports(), *resources], env, node_dir / "ray-start.log")
            nodes.append((node, node_dir))
        if workers:  # the state API: without a token, which only the token-auth test's head needs
            wait_for_nodes(head, 1 + len(workers), nodes)
        yield head
    finally:
        leftovers = [pid for node, node_dir in nodes for pid in stop_head(node, node_dir)]
        leftovers += stop_head(process, temp_dir)
    assert not leftovers, f"processes outlived the nodes' SIGTERM (killed now): {leftovers}"


def wait_for_nodes(head: Head, count: int, nodes: list[tuple[subprocess.Popen, Path]],
                   timeout: float = 120) -> None:
    """Until `count` nodes are alive in the cluster; fails early with a worker node's output if it died."""
    from ray.util.state import list_nodes

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node, node_dir in nodes:
            if node.poll() is not None:
                pytest.fail(f"a worker node's ray start exited with {node.returncode}:\n"
                            f"{(node_dir / 'ray-start.log').read_text()}")
        if len(list_nodes(address=head.address, filters=[("state", "=", "ALIVE")])) >= count:
            return
        time.sleep(1)
    pytest.fail(f"{count} nodes did not come up in {timeout:.0f} s")


def stop_head(process: subprocess.Popen, temp_dir: Path) -> list[int]:
    """SIGTERM to `ray start --block`, which stops its node's processes; SIGKILL, by pid, to any that remain.
    Returns the pids that had to be killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    leftovers = processes_under(temp_dir)
    for pid in leftovers:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp_dir, ignore_errors=True)
    return leftovers


def wait_for_job_api(head: Head, process: subprocess.Popen, log_path: Path, timeout: float = 180) -> None:
    """Until the dashboard answers the job API; fails early with `ray start`'s output if the head died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            urllib.request.urlopen(f"{head.address}/api/version", timeout=5).close()
            return
        except urllib.error.HTTPError:  # 401 from a head with token auth: up, and guarded
            return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"the job API of {head.address} did not come up in {timeout:.0f} s:\n{log_path.read_text()}")
