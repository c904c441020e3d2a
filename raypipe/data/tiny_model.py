"""Build the embedded default's tokenizer and tiny Llama model from scratch, offline.

The tokenizer is a byte-level BPE trained on the task's own text, with every digit its own token and chunks
split after each newline, so a prompt's token ids are always a prefix of prompt + completion (step-level pairs and
continuation from a prefix rely on this). The model is a normal Hugging Face directory (safetensors) that
transformers, vLLM and DeepSpeed all load like any other checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from raypipe.config import ModelConfig
from raypipe.data.steps import COT_PREFILL

EOS, PAD = "<eos>", "<pad>"
VOCAB_CAP = 512
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] | trim }}\n"
    + COT_PREFILL
    + "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{% endif %}{% endfor %}"
)
"""A chat turn renders exactly as `format_prompt` (system turns are dropped): OpenAI chat clients of the served
model see the prompt it was trained on."""


def build_tokenizer(corpus: Iterable[str]) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on `corpus` (the task's prompts and solutions)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="merged_with_previous"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_CAP, special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=1024,
                                   chat_template=CHAT_TEMPLATE)


def build_tiny_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by `cfg` (1.1M parameters at the defaults).

    Llama rather than Qwen2: transformers 5 forces its Qwen2 tokenizer class (and Qwen's pre-tokenizer regex) on
    any qwen2 checkpoint, which would silently replace our digit/newline pre-tokenizer on load.
    """
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,  # a separate lm_head costs 43k parameters and keeps every reload path plain
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(cfg.init_seed)
    return LlamaForCausalLM(config)


def save_tiny_model(cfg: ModelConfig, corpus: Iterable[str], out_dir: Path) -> Path:
    """Build tokenizer and model and save both as one HF directory; returns it."""
    tokenizer = build_tokenizer(corpus)
    return save_model_dir(build_tiny_model(cfg, tokenizer), tokenizer, out_dir)


def save_model_dir(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """A model and its tokenizer as one HF directory (safetensors), generation padding and stopping at the
    tokenizer's own pad and end-of-sequence tokens; returns it."""
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
