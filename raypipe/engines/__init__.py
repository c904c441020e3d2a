"""Generation engines behind one interface (`Generator`); `make_generator` picks one by config."""

from raypipe.config import EngineConfig
from raypipe.engines.base import Completion, Generator, SamplingSpec


def make_generator(cfg: EngineConfig, model_dir: str) -> Generator:
    """Load `model_dir` into the configured engine, imported lazily (importing vLLM takes seconds)."""
    if cfg.backend == "vllm":
        from raypipe.engines.vllm import VLLMGenerator

        return VLLMGenerator(cfg, model_dir)
    if cfg.backend == "hf":
        from raypipe.engines.hf import HFGenerator

        return HFGenerator(cfg, model_dir)
    raise ValueError(f"engine.backend={cfg.backend!r} is not one of ['hf', 'vllm']")


__all__ = ["Completion", "Generator", "SamplingSpec", "make_generator"]
