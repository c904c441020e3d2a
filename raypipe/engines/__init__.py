"""Generation engines behind two interfaces: token ids (`Generator`: the policy's sampling, branching and
evaluation) and text (`TextGenerator`: the data methods' model calls). `make_generator` and
`make_text_generator` pick one by config."""

from __future__ import annotations

from pathlib import Path

from raypipe.config import EngineConfig
from raypipe.data_config import ModelCallConfig
from raypipe.engines.base import Completion, Generator, SamplingSpec
from raypipe.engines.text import EngineError, Message, TextGenerator, Usage


def make_generator(cfg: EngineConfig, model_dir: str) -> Generator:
    """Load `model_dir` into the configured engine, imported lazily (importing vLLM takes seconds)."""
    if cfg.backend == "vllm":
        from raypipe.engines.vllm import VLLMGenerator

        return VLLMGenerator(cfg, model_dir)
    if cfg.backend == "hf":
        from raypipe.engines.hf import HFGenerator

        return HFGenerator(cfg, model_dir)
    raise ValueError(f"engine.backend={cfg.backend!r} is not one of ['hf', 'vllm']")


def make_text_generator(cfg: ModelCallConfig, engine: EngineConfig, run_dir: Path) -> TextGenerator:
    """An OpenAI-compatible client (its cache under `run_dir` unless the path is absolute) or a local model."""
    if cfg.backend == "openai":
        from raypipe.engines.openai_api import OpenAIEngine

        cache = None if cfg.cache_dir is None else run_dir / cfg.cache_dir
        return OpenAIEngine(cfg, cache)
    if cfg.backend == "local":
        from transformers import AutoTokenizer

        from raypipe.engines.checks import context_length
        from raypipe.engines.text import LocalTextGenerator

        generator = make_generator(engine, cfg.model)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=engine.trust_remote_code)
        return LocalTextGenerator(generator, tokenizer, context_length(cfg.model, engine.max_model_len))
    raise ValueError(f"backend={cfg.backend!r} is not one of ['local', 'openai']")


__all__ = ["Completion", "EngineError", "Generator", "Message", "SamplingSpec", "TextGenerator", "Usage",
           "make_generator", "make_text_generator"]
