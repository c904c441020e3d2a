"""`serve run serving/config.yaml`: Ray's own CLI starts the same app from the Serve config (its own Ray)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_serve_run_starts_the_app_from_the_serve_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = yaml.safe_load((ROOT / "serving" / "config.yaml").read_text())
    config["http_options"]["port"] = port
    config["applications"][0]["args"].update(model=str(tiny_model_dir), device="cpu", max_tokens=32)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "serve.log").open("w")
    serve_cli = str(Path(sys.executable).with_name("serve"))
    process = subprocess.Popen([serve_cli, "run", str(path)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            try:
                if requests.get(f"{url}/v1/models", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # the proxy is up before the app: refused, or no answer yet
                pass
            time.sleep(2)
        assert [m["id"] for m in requests.get(f"{url}/v1/models", timeout=30).json()["data"]] == ["raypipe"]
        answer = requests.post(f"{url}/v1/completions", json={"model": "raypipe", "prompt": "Start with 5.",
                                                              "max_tokens": 8}, timeout=300)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] > 0
        assert "raypipe demo" in requests.get(url + "/", timeout=30).text
    finally:
        process.send_signal(signal.SIGINT)  # serve run shuts the app and its Ray down on Ctrl-C
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
