"""The settings of the data methods that call a model on text (ReAlign, LEMA): which model answers, and how.

Split out of raypipe/config.py (which composes them into RunConfig) so each data method's knobs sit together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raypipe.update_config import OptimConfig, UpdateConfig


@dataclass
class ModelCallConfig:
    """A text model behind the chat / completion interface: an OpenAI-compatible endpoint or a local engine."""

    backend: str = "openai"
    """'openai' (any OpenAI-compatible server: vLLM, raypipe serve, a hosted API) or 'local' (a Hugging Face
    folder loaded in this process by the configured `engine`)."""
    base_url: str = "http://127.0.0.1:8000/v1"
    """openai: the API root, ending in /v1."""
    model: str = "raypipe"
    """openai: the model name sent with each request. local: the Hugging Face model folder."""
    api_key_env: str | None = None
    """openai: NAME of the environment variable holding the key (keys never go in a config file), e.g.
    OPENAI_API_KEY for OpenAI's API. null, or the variable unset: requests go without a key (a local server). Never
    implied, so a provider's key is not sent to whatever `base_url` points at."""
    key_over_http: bool = False
    """openai: let the key go over plain http:// to another machine (anyone on the way can read it). Off: that is a
    config error before any request; https:// and loopback (127.0.0.0/8, ::1, localhost) are always allowed."""
    max_concurrency: int = 8
    """openai: requests in flight at once."""
    max_retries: int = 4
    """openai: retries of a request answered 408/409/429/5xx or cut by a connection error, with exponential
    backoff and jitter (the openai client's own policy)."""
    timeout_s: float = 120.0
    """openai: seconds before a request is abandoned (then retried)."""
    cache_dir: str | None = "cache/model_calls"
    """Responses cached on disk keyed by the whole request (URL, model name, messages, sampling) and the served
    weights, so a rerun does not pay twice; relative paths are under the run folder. The weights are known when the
    server names them (`raypipe serve` puts their hash in `/v1/models`); behind any other server a different
    checkpoint under the same name and URL is the same key: use a new run folder or delete the cache. null turns
    caching off."""


@dataclass
class ReAlignConfig:
    """ReAlign: rewrite the responses of a (query, response) dataset into task-specific formats."""

    input: str = "../shared/data/gsm8k/train.jsonl"
    """The dataset: a .jsonl or .parquet file, or a folder written by `datasets.Dataset.save_to_disk`."""
    query_field: str = "question"
    """Field holding the user's query."""
    response_field: str = "answer"
    """Field holding the response to rewrite."""
    limit: int | None = None
    """First N rows only (null: all)."""
    max_rejected_fraction: float = 1.0
    """Stop with an error when more than this share of the input's rows is rejected (bad JSON, missing fields...;
    every one is listed in rejected.jsonl either way). 1.0: never stop, rewrite the usable rows; 0.0: any bad row
    is an error."""
    classifier: str = "keyword"
    """'keyword' (deterministic, offline) or 'model' (the published prompt: the model names one of the 46 tasks;
    an unknown answer falls back to 'default')."""
    task: str | None = None
    """Skip classification and give every row this task (e.g. 'math_puzzles' for a math dataset)."""
    rewriter: str = "model"
    """'model' (the rewrite prompt through `realign.model`) or 'math_template' (a deterministic rewrite of
    step-per-line math solutions into the math_puzzles format: offline, no model)."""
    adaptive: bool = True
    """Adaptive rewriting (the model may keep the original when the format does not fit). Off: the forced
    variant, as the paper uses for math datasets."""
    samples: int = 2
    """Rewrites per row; the longest is kept (published: 2)."""
    temperature: float = 0.3
    """Rewrite sampling temperature (published: 0.3)."""
    top_p: float = 0.1
    """Rewrite nucleus sampling (published: 0.1)."""
    max_tokens: int = 1024
    """Cap on one rewrite, in tokens."""
    corpus: str | None = None
    """Retrieval: a JSONL file of passages (`text`, optional `title`) indexed with BM25 for the 5
    knowledge-intensive tasks. null and no web key: those tasks are rewritten without evidence."""
    web_search_key_env: str = "SERPER_API_KEY"
    """Retrieval: NAME of the environment variable with a Serper.dev key; when set, web search replaces the local
    index."""
    evidence_k: int = 5
    """Evidence passages put in the prompt (published: top 5)."""
    min_length_ratio: float = 0.5
    """Length filter: a rewrite with fewer than this share of the original's words falls back to the original."""
    model: ModelCallConfig = field(default_factory=ModelCallConfig)
    """The model that classifies (classifier=model) and rewrites (rewriter=model)."""


@dataclass
class LEMAConfig(UpdateConfig):
    """LEMA: fine-tune on CoT data mixed with corrections of the policy's (and other models') mistakes."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=0, batch_size=64))
    corrector: str = "exact"
    """'exact' (the embedded task's programmatic corrector: offline, always right) or 'model' (the few-shot
    corrector prompt through `corrector_model`; published: GPT-4)."""
    corrector_model: ModelCallConfig = field(default_factory=ModelCallConfig)
    """The corrector when corrector=model."""
    corrector_chat: bool = False
    """Send the corrector prompt as one chat message (hosted chat models) instead of a raw completion."""
    corrector_max_tokens: int = 256
    """Cap on one correction, in tokens."""
    mistake_models: list[ModelCallConfig] = field(default_factory=list)
    """More generator models whose wrong answers to the round's questions are corrected too (LEMA collects
    mistakes from several models); the policy's own samples are always used."""
    max_mistakes_per_question: int = 2
    """Distinct wrong solutions corrected per question and source."""
    explanations: bool = True
    """Train on the corrector's explanation. False is the explanation-free ablation: a correction example's output
    is `Step k.` and the corrected solution only, so a test of whether the explanation (which quotes the wrong
    result) helps or hurts changes nothing else."""
    evolve_questions: int = 0
    """Correction-centric evolution: new questions grown each round from the questions of the kept corrections
    (drawn with replacement), pseudo-labelled by a 3-sample policy majority, then collected and corrected the
    same way. 0: off. Embedded task only (a template evolver)."""
