"""`raypipe serve`: start the Serve application of serving/ on this machine (or the RAY_ADDRESS cluster)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict

from raypipe.ray_env import init_ray

log = logging.getLogger(__name__)
SERVE_CPUS = 4
"""Logical CPUs a local cluster needs: the vLLM replica, the ingress and Serve's proxy and controller."""


def start(model: str, overrides: list[str], host: str = "127.0.0.1", port: int = 8000) -> str:
    """Deploy the app and return its URL once every replica is ready (about 40 s on 2 CPU cores)."""
    from ray import serve

    from serving.app import build_app
    from serving.settings import load_serve_config

    cfg = load_serve_config({"model": model}, overrides, source="raypipe serve")  # errors before Ray starts
    init_ray(max(SERVE_CPUS, os.cpu_count() or 1))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(asdict(cfg)), name="raypipe", route_prefix="/")
    return f"http://{host}:{port}"


def serve_forever(model: str, overrides: list[str], host: str, port: int) -> None:
    import time

    from ray import serve

    url = start(model, overrides, host, port)
    log.info("serving at %s (demo page at %s/, OpenAI API at %s/v1); Ctrl-C stops", url, url, url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
