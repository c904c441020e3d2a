"""Log-probs of a causal LM's scored tokens: the one model-touching function of training and of reference
scoring, and the trainable model built around it (`load_policy`).

`TokenLogProbs` wraps the Hugging Face model; the DeepSpeed engine wraps it in turn, so `engine(input_ids=...,
attention_mask=..., loss_mask=...)` runs through `engine.forward` (ZeRO-3's start-of-forward hook, parameter
gathering) and returns the log-probs, never the logits. The reference scorer calls the same module, so the
policy at step 0 reproduces the reference's numbers.

The chunked path never builds the batch's (B, T, V) logits or log-softmax (at T = 4096 and V = 152k that is
2.5 GB per row in fp32, twice): it runs the decoder to its final hidden states, keeps the positions whose next
token is scored, and applies the output layer `chunk_tokens` positions at a time, each chunk under activation
checkpointing, so only one (chunk x V) block of logits is alive at a time, in backward too.

With `packing`, the batch's sequences are first packed into fewer rows (collate.pack_lines) with position ids
restarting at each sequence and no 2D attention mask: transformers then builds a block-diagonal causal mask
from the position ids (masking_utils.find_packed_sequence_indices; tested with sdpa and eager attention), so
no sequence sees another. The log-probs come back in the padded layout, so the objectives do
not know whether the batch was packed.

With `share_prefix`, a preference batch (rows i and n + i the chosen and rejected sides of pair i) runs each
pair's common prefix once: the pair becomes one sequence, prefix + chosen continuation + rejected continuation,
both continuations positioned right after the prefix, and a 4D attention mask keeps the rejected tokens from
seeing the chosen ones. Step-level pairs share all but their last step, so this nearly halves the tokens a DPO
step computes. The mask is an explicit one (sdpa or eager attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from raypipe.config import ConfigError
from raypipe.train.collate import pack_lines, share_prefix_layout
from raypipe.train.losses import token_logps

if TYPE_CHECKING:
    from raypipe.config import TrainConfig
    from raypipe.update_config import LoRAConfig

_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}
"""Config fields of models whose logits are not the plain output layer (Gemma 2's soft-capping, Cohere's
scale, Granite's divisor), with the value that makes them plain. The chunked path computes `lm_head(hidden)`
only."""


_MASK_KINDS = {"sdpa": "bool", "eager": "additive"}
"""Attention implementations that take an explicit 4D mask, and the form they take it in (sdpa: True where a
token may attend; eager: 0 there and the dtype's minimum elsewhere, added to the scores)."""


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
    ranks. `packing`: run the rows packed (the module docstring), for right-padded batches. `share_prefix`: run
    each preference pair's common prefix once when `forward` is told the batch is pairs (the module docstring).
    """

    def __init__(self, model: Any, chunk_tokens: int, equal_calls: bool = False,
                 packing: bool = False, share_prefix: bool = False) -> None:
        super().__init__()
        if chunk_tokens < 0:
            raise ConfigError(f"train.logits_chunk_tokens={chunk_tokens} must be >= 0")
        if chunk_tokens:
            check_plain_head(model)
        attention = getattr(model.config, "_attn_implementation", None)
        if share_prefix and attention not in _MASK_KINDS:
            raise ConfigError(f"train.share_prefix needs an explicit attention mask, which {attention!r} "
                              f"attention does not take: load the model with one of {sorted(_MASK_KINDS)}")
        self.model, self.chunk_tokens = model, chunk_tokens
        self.equal_calls, self.packing, self.share_prefix = equal_calls, packing, share_prefix

    @property
    def device(self) -> torch.device:
        return self.model.device

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, pairs: bool = False) -> Tensor:
        """`pairs`: rows i and B/2 + i are the chosen and rejected sides of one preference pair."""
        if pairs and self.share_prefix:
            return self._shared(input_ids, attention_mask, loss_mask)
        if self.packing:
            return self._packed(input_ids, attention_mask, loss_mask)
        return self._logps(input_ids, loss_mask, attention_mask=attention_mask)

    def _packed(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
        """`_logps` of the rows packed into lines, returned in the rows' padded (B, T-1) layout."""
        lengths = attention_mask.sum(-1).tolist()
        width = input_ids.shape[1]
        lines = pack_lines(lengths, width)
        device = input_ids.device
        ids, positions, mask = (torch.zeros((len(lines), width), dtype=torch.long, device=device)
                                for _ in range(3))
        where = {}
        for k, rows in enumerate(lines):
            start = 0
            for row in rows:
                n = lengths[row]
                ids[k, start:start + n] = input_ids[row, :n]
                positions[k, start:start + n] = torch.arange(n, device=device)
                mask[k, start + 1:start + n] = loss_mask[row, 1:n]  # a row's first token is never scored
                where[row], start = (k, start), start + n
            positions[k, start:] = torch.arange(width - start, device=device)  # padding: one more sequence
        logps = self._logps(ids, mask, position_ids=positions)
        rows = [logps[line, start:start + max(lengths[r] - 1, 0)]
                for r, (line, start) in sorted(where.items())]
        out = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        return torch.nn.functional.pad(out, (0, width - 1 - out.shape[1]))

    def _logps(self, input_ids: Tensor, loss_mask: Tensor, attention_mask: Tensor | None = None,
               position_ids: Tensor | None = None) -> Tensor:
        """The log-probs of one (padded or packed) batch, chunked or from the full logits."""
        scored = loss_mask[:, 1:].bool()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": False}
        if not self.chunk_tokens:
            return token_logps(self.model(**inputs).logits, input_ids).masked_fill(~scored, 0.0)
        hidden = self.model.get_decoder()(**inputs).last_hidden_state
        values = self._head_logps(hidden[:, :-1][scored], input_ids[:, 1:][scored])
        zero = hidden[:, :-1, 0].to(values.dtype) * 0  # attached to the graph even when nothing is scored
        return zero.masked_scatter(scored, values)

    def _head_logps(self, states: Tensor, targets: Tensor) -> Tensor:
        """log softmax(lm_head(states))[targets], `chunk_tokens` states at a time."""
        size = self.chunk_tokens
        calls = max(1, -(-len(targets) // size))
        if self.equal_calls and dist.is_initialized():
            count = torch.tensor([calls], device=states.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            calls = int(count.item())
        head = self.model.get_output_embeddings()
        return torch.cat([checkpoint(_chunk_logps, head, states[i * size:(i + 1) * size],
                                     targets[i * size:(i + 1) * size], use_reentrant=False)
                          for i in range(calls)])

    def _shared(self, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor) -> Tensor:
        """The (B, T-1) log-probs of a pair batch, each pair run as one sequence: its common prefix, then the
        chosen and the rejected continuations, both at the positions that follow the prefix."""
        layout = share_prefix_layout(input_ids, attention_mask, loss_mask)
        mask = layout.attention_mask(_MASK_KINDS[self.model.config._attn_implementation],
                                     next(self.model.parameters()).dtype)
        inputs = {"input_ids": layout.ids, "attention_mask": mask, "position_ids": layout.positions,
                  "use_cache": False}
        lines, columns = layout.sources
        if self.chunk_tokens:
            hidden = self.model.get_decoder()(**inputs).last_hidden_state
            values = self._head_logps(hidden[lines, columns], layout.targets)
        else:
            hidden = self.model(**inputs).logits
            values = _chunk_logps(torch.nn.Identity(), hidden[lines, columns], layout.targets)
        zero = hidden[:1, :1, 0].to(values.dtype) * 0  # attached to the graph even when nothing is scored
        out = zero.expand(input_ids.shape[0], input_ids.shape[1] - 1)
        return out.index_put(layout.rows, values)


def load_policy(model_dir: str, cfg: TrainConfig, lora: LoRAConfig | None,
                equal_calls: bool = False) -> TokenLogProbs:
    """The trainable model as DeepSpeed gets it: weights in the training dtype, optional gradient
    checkpointing and LoRA adapters, in train mode, inside the `TokenLogProbs` that the objectives call."""
    from transformers import AutoModelForCausalLM

    # safetensors only, and never a model folder's own code (engine.trust_remote_code covers generation only)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                 trust_remote_code=False)
    if cfg.gradient_checkpointing:  # non-reentrant: frozen inputs (LoRA) need no enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None and lora.rank:
        model = _with_lora(model, lora)
    model.train()  # from_pretrained leaves eval mode, where checkpointing and dropout (LoRA's too) are off
    return TokenLogProbs(model, cfg.logits_chunk_tokens, equal_calls=equal_calls, packing=cfg.packing,
                         share_prefix=cfg.share_prefix)


def _with_lora(model: Any, lora: LoRAConfig) -> Any:
    """The model with trainable low-rank adapters (peft) and every base weight frozen."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if lora.target_modules == "all-linear" else [
        m.strip() for m in lora.target_modules.split(",") if m.strip()]
    return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=targets, task_type="CAUSAL_LM"))
