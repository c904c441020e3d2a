"""The text interface of the data methods: chat or completion requests in, text out, usage counted.

Correctors, classifiers and rewriters work on text, not token ids, and may live behind an HTTP API. They call a
`TextGenerator`: an OpenAI-compatible endpoint (`raypipe.engines.openai_api`) or a local engine wrapped here, so
the same stage code runs against a hosted model, a vLLM server, `raypipe serve`, or a folder on disk.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from raypipe.engines.base import Generator, SamplingSpec

log = logging.getLogger(__name__)

Message = dict[str, str]
"""One chat turn: {"role": "system" | "user" | "assistant", "content": ...}."""


class EngineError(RuntimeError):
    """A model call that cannot succeed (bad key, unknown model, server unreachable after retries); the message
    says what to fix."""


@dataclass
class Usage:
    """Token and request totals of a generator's life, for the stage manifest."""

    requests: int = 0
    """Requests answered (cache hits excluded)."""
    rejected: int = 0
    """Requests rejected on their own merits (HTTP 400, or too long for a local model); they have no completions."""
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "rejected": self.rejected, "cache_hits": self.cache_hits,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class TextGenerator(ABC):
    """Samples text for chat conversations or raw prompts; `spec.n` completions each, in input order.

    A request rejected on its own merits (HTTP 400, or a prompt longer than a local model's context) gets
    an empty list instead of failing the batch, and is counted in `usage.rejected`; callers record that row's
    outcome as 'request_rejected'. Errors that doom every request (a bad key, an unknown model, no server) raise
    EngineError."""

    usage: Usage

    @abstractmethod
    def chat(self, conversations: Sequence[list[Message]], spec: SamplingSpec) -> list[list[str]]:
        """The assistant's next turn for each conversation."""

    @abstractmethod
    def complete(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[str]]:
        """Continuations of each raw prompt (no chat template)."""

    def close(self) -> None:
        """Release connections or memory; the default does nothing."""


def prompt_too_long(prompt_tokens: int, max_new_tokens: int, context: int) -> str | None:
    """Why a prompt cannot be sent (empty, or no room left in the context for its whole answer), or None."""
    if prompt_tokens == 0:
        return "prompt is empty (0 tokens)"
    if prompt_tokens + max_new_tokens > context:
        return f"prompt is {prompt_tokens} tokens; the model context is {context} with max_new_tokens {max_new_tokens}"
    return None


@dataclass
class LocalTextGenerator(TextGenerator):
    """A token-id `Generator` (vLLM or transformers) driven with text through its tokenizer's chat template.

    A prompt that does not fit `max_model_len` with its `max_tokens` fails alone, like an HTTP server's 400: an
    empty list, counted in `usage.rejected` (vLLM would otherwise raise for the whole batch)."""

    generator: Generator
    tokenizer: object
    max_model_len: int
    """The engine's context (`raypipe.engines.checks.context_length`)."""
    usage: Usage = field(default_factory=Usage)

    def chat(self, conversations: Sequence[list[Message]], spec: SamplingSpec) -> list[list[str]]:
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)  # type: ignore
                 for c in conversations]
        return self.complete(texts, spec)

    def complete(self, prompts: Sequence[str], spec: SamplingSpec) -> list[list[str]]:
        ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]  # type: ignore[operator]
        return self._generate(ids, spec)

    def _generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[list[str]]:
        fits = []
        for i, prompt in enumerate(prompts):
            why = prompt_too_long(len(prompt), spec.max_tokens, self.max_model_len)
            if why is None:
                fits.append(i)
            else:
                log.warning("local model: request rejected (%s)", why)
                self.usage.rejected += 1
        groups = self.generator.generate([prompts[i] for i in fits], spec) if fits else []
        self.usage.requests += len(fits)
        self.usage.prompt_tokens += sum(len(prompts[i]) for i in fits)
        self.usage.completion_tokens += sum(len(c.token_ids) for group in groups for c in group)
        texts: list[list[str]] = [[] for _ in prompts]
        for i, group in zip(fits, groups):
            texts[i] = [c.text for c in group]
        return texts

    def close(self) -> None:
        self.generator.close()
