"""transformers `generate` behind the generator interface: always available, any device, no vLLM needed.

It is the reference the vLLM engine is tested against, and the fallback where vLLM does not install.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from raypipe.config import EngineConfig
from raypipe.engines.base import Completion, FinishReason, Generator, SamplingSpec
from raypipe.engines.checks import require_safetensors


class HFGenerator(Generator):
    """Batched, left-padded `generate`; outputs are cut and labelled exactly like vLLM's."""

    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        require_safetensors(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, cfg.dtype),
                                                          use_safetensors=True,
                                                          trust_remote_code=cfg.trust_remote_code)
        self.model.to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        # generate fills each knob left unset from the checkpoint's defaults (e.g. Qwen's repetition_penalty);
        # vLLM given explicit SamplingParams ignores them, so start from a neutral config as vLLM does
        self.model.generation_config = GenerationConfig(eos_token_id=sorted(self.eos_ids),
                                                        pad_token_id=self.pad_id)

    @torch.inference_mode()
    def load_weights(self, model_dir: str) -> None:
        """Copy the checkpoint's tensors into the live parameters (no second model in memory).

        A tied lm_head is absent from the checkpoint and shares storage with the embedding, so it is covered.
        """
        params = self.model.state_dict()
        loaded: set[int] = set()
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name not in params:
                        raise KeyError(f"{path}: {name} is not a parameter of the loaded model")
                    params[name].copy_(f.get_tensor(name))
                    loaded.add(params[name].data_ptr())
        missing = [name for name, t in params.items() if t.data_ptr() not in loaded]
        if missing:
            raise KeyError(f"{model_dir} lacks weights for {missing[:5]} ({len(missing)} in all)")

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec,
                 seeds: Sequence[int] | None = None) -> list[list[Completion]]:
        """One `generate` samples a whole batch from torch's global generator, so per-prompt seeds cannot hold:
        the first prompt's seed seeds the call (reproducible for the same batches, which a rerun has)."""
        seed = seeds[0] if seeds else spec.seed
        if seed is not None:
            torch.manual_seed(seed)
        copies = spec.n if spec.temperature == 0 else 1  # generate rejects greedy n > 1; copies are equal
        spec = replace(spec, n=spec.n // copies)
        per_call = max(1, self.cfg.hf_batch_size // spec.n)  # hf_batch_size counts sequences, not prompts
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), per_call):
            results += self._generate_batch(prompts[start:start + per_call], spec)
        return [group * copies for group in results]

    def _generate_batch(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec) -> list[list[Completion]]:
        width = max(len(p) for p in prompts)
        padded = [[self.pad_id] * (width - len(p)) + list(p) for p in prompts]
        input_ids = torch.tensor(padded, device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        # top_k=0 turns off transformers' default top-k of 50, which vLLM does not apply
        sampling = ({"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0}
                    if spec.temperature > 0 else {"do_sample": False})
        stops = {"stop_strings": list(spec.stop), "tokenizer": self.tokenizer} if spec.stop else {}
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=spec.max_tokens,
            num_return_sequences=spec.n, **sampling, **stops)
        generated = out[:, width:].tolist()
        return [[self._completion(generated[i * spec.n + j], spec.stop) for j in range(spec.n)]
                for i in range(len(prompts))]

    def _completion(self, ids: list[int], stop: tuple[str, ...]) -> Completion:
        """Cut at the end of sequence (padding follows it), then right after a completed stop string."""
        reason: FinishReason = "length"
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        if end is not None:
            ids, reason = ids[:end], "eos"
        cut = self._stop_cut(ids, stop)
        if cut is not None:
            ids, reason = ids[:cut], "stop"
        return Completion(token_ids=ids, text=self._decode(ids), finish_reason=reason)

    def _stop_cut(self, ids: list[int], stop: tuple[str, ...]) -> int | None:
        """Length of the shortest prefix whose text holds a stop string, or None.

        Binary search: a prefix holding a stop string still holds it when it grows, so log2(len) decodes do.
        """
        def holds(k: int) -> bool:
            text = self._decode(ids[:k])
            return any(s in text for s in stop)

        if not stop or not holds(len(ids)):
            return None
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid) else (mid + 1, hi)
        return lo

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
