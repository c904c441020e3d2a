"""Log-probs of a causal LM's scored tokens: the one model-touching function of training and of reference
scoring.

`TokenLogProbs` wraps the Hugging Face model; the DeepSpeed engine wraps it in turn, so `engine(input_ids=...,
attention_mask=..., loss_mask=...)` runs through `engine.forward` (ZeRO-3's start-of-forward hook, parameter
gathering) and returns the log-probs, never the logits. The reference scorer calls the same module, so the
policy at step 0 reproduces the reference's numbers.

The chunked path never builds the batch's (B, T, V) logits or log-softmax (at T = 4096 and V = 152k that is
2.5 GB per row in fp32, twice): it runs the decoder to its final hidden states, keeps the positions whose next
token is scored, and applies the output layer `chunk_tokens` positions at a time, each chunk under activation
checkpointing, so only one (chunk x V) block of logits is alive at a time, in backward too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from raypipe.config import ConfigError
from raypipe.train.losses import token_logps

_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
"""Config fields of models whose logits are not the plain output layer (Gemma 2's soft-capping, Cohere's
scale, Granite's divisor), with the value that makes them plain. The chunked path computes `lm_head(hidden)`
only."""


def check_plain_head(model: Any) -> None:
    """ConfigError unless `model`'s logits are exactly its output layer applied to the decoder's hidden
    states."""
    config = model.config
    for name, plain in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, plain)
        if value is not None and value != plain:
            raise ConfigError(f"{type(model).__name__} transforms its logits ({name}={value}): chunked "
                              "log-probs would differ from its forward; set train.logits_chunk_tokens=0")
    if model.get_output_embeddings() is None or not hasattr(model, "get_decoder"):
        raise ConfigError(f"{type(model).__name__} has no separate decoder and output layer: set "
                          "train.logits_chunk_tokens=0")


def _chunk_logps(head: torch.nn.Module, states: Tensor, targets: Tensor) -> Tensor:
    """log softmax(head(states))[targets] for one chunk, with the logsumexp in (at least) fp32."""
    logits = head(states)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class TokenLogProbs(torch.nn.Module):
    """`forward(input_ids, attention_mask, loss_mask)` -> (B, T-1): the log-prob of each token
    input_ids[:, 1:] where loss_mask[:, 1:] is set, 0 elsewhere. `chunk_tokens` 0: the plain full-logits path.

    `equal_calls`: all-reduce the chunk count so every rank calls the output layer equally often (ZeRO-3
    gathers its weight at each call, a collective every rank must join); set it under ZeRO-3 with several
    ranks.
    """

    def __init__(self, model: Any, chunk_tokens: int, equal_calls: bool = False) -> None:
        super().__init__()
        if chunk_tokens < 0:
            raise ConfigError(f"train.logits_chunk_tokens={chunk_tokens} must be >= 0")
        if chunk_tokens:
            check_plain_head(model)
        self.model, self.chunk_tokens, self.equal_calls = model, chunk_tokens, equal_calls

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
        scored = loss_mask[:, 1:].bool()
        if not self.chunk_tokens:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return token_logps(logits, input_ids).masked_fill(~scored, 0.0)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                          use_cache=False).last_hidden_state
        states, targets = hidden[:, :-1][scored], input_ids[:, 1:][scored]
        size = self.chunk_tokens
        calls = max(1, -(-len(targets) // size))
        if self.equal_calls and dist.is_initialized():
            count = torch.tensor([calls], device=hidden.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            calls = int(count.item())
        head = self.model.get_output_embeddings()
        values = torch.cat([checkpoint(_chunk_logps, head, states[i * size:(i + 1) * size],
                                       targets[i * size:(i + 1) * size], use_reentrant=False)
                            for i in range(calls)])
        zero = hidden[:, :-1, 0].to(values.dtype) * 0  # attached to the graph even when nothing is scored
        return zero.masked_scatter(scored, values)
