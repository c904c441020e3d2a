"""transformers `generate` behind the generator interface: always available, any device."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.config import EngineConfig
from raypipe.engines.base import Completion, FinishReason, Generator, SamplingSpec


class HFGenerator(Generator):
    """Batched `generate` with left padding; stop strings end a completion right after the token that made them."""

    def __init__(self, cfg: EngineConfig, model_dir: str) -> None:
        self.cfg = cfg
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = self._load(model_dir)

    def _load(self, model_dir: str) -> torch.nn.Module:
        dtype = getattr(torch, self.cfg.dtype)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()

    def load_weights(self, model_dir: str) -> None:
        self.model = self._load(model_dir)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec) -> list[list[Completion]]:
        if spec.seed is not None:
            torch.manual_seed(spec.seed)
        per_call = max(1, self.cfg.hf_batch_size // spec.n)
        results: list[list[Completion]] = []
        for start in range(0, len(prompts), per_call):
            results += self._generate_batch(prompts[start:start + per_call], spec)
        return results

    def _generate_batch(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec) -> list[list[Completion]]:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=self.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        sampling = {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p, "top_k": 0} \
            if spec.temperature > 0 else {"do_sample": False}
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention, max_new_tokens=spec.max_tokens,
            num_return_sequences=spec.n, pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=list(spec.stop) or None, tokenizer=self.tokenizer if spec.stop else None, **sampling)
        generated = out[:, width:].tolist()
        return [[self._completion(generated[i * spec.n + j], spec) for j in range(spec.n)]
                for i in range(len(prompts))]

    def _completion(self, ids: list[int], spec: SamplingSpec) -> Completion:
        eos = self.tokenizer.eos_token_id
        kept: list[int] = []
        reason: FinishReason = "length"
        for token in ids:
            if token == eos:
                reason = "eos"
                break
            kept.append(token)
            if spec.stop and any(s in self.tokenizer.decode(kept, skip_special_tokens=True) for s in spec.stop):
                reason = "stop"
                break
        return Completion(token_ids=kept, text=self.tokenizer.decode(kept, skip_special_tokens=True),
                          finish_reason=reason)
