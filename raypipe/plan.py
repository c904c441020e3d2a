"""GPU memory plan of a run: per stage, the estimated memory of each GPU and how many GPUs it takes,
computed from the model's config.json alone (no weights read, no model built, no GPU), so that a recipe
which cannot fit is refused, with the settings that would help, before Ray, vLLM or DeepSpeed start.

Included: weights, gradients and Adam states by ZeRO stage (and CPU offload), activations of one micro-batch
(`activation_bytes`), the log-softmax over the vocabulary (`logit_bytes`), vLLM's KV cache, and a fixed
CUDA allowance per process. Not included: DeepSpeed's communication buckets, allocator fragmentation,
vLLM's profiled forward peak and CUDA graphs, LoRA (full fine-tuning is planned: an upper bound), host
memory. Estimates, not measurements: none of these figures has been checked on a GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from rich import box
from rich.table import Table

from raypipe.config import ConfigError, RunConfig, TrainConfig
from raypipe.console import terminal

GiB = 2**30
CUDA_ALLOWANCE = int(1.5 * GiB)
"""Per GPU process: the CUDA context (about 0.5 GiB), cuBLAS/NCCL workspaces and allocator slack."""
TRAIN_LOGIT_COPIES = 3
"""fp32 vocabulary-wide copies live at the loss's peak: the logits, their log-softmax (kept for the
backward) and the gradient flowing back through them."""
SCORE_LOGIT_COPIES = 2
"""Scoring without gradients: the fp32 logits and their log-softmax."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What the plan needs of a decoder-only model (Llama / Qwen2 layout: GQA, SwiGLU MLP, RMSNorm)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    """lm_head shares the embedding matrix (config.json's tie_word_embeddings)."""
    qkv_bias: bool
    """q/k/v projections carry a bias (Qwen2 always; `attention_bias` elsewhere)."""


def shape_from_config_json(raw: dict[str, Any], source: str) -> Shape:
    """A Shape from a Hugging Face config.json. A missing tie_word_embeddings counts a separate lm_head (the
    larger figure); Qwen2's config.json does not mention the q/k/v bias its layers have."""
    try:
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        return Shape(hidden, int(raw["intermediate_size"]), int(raw["num_hidden_layers"]), heads, kv_heads,
                     head_dim, int(raw["vocab_size"]), bool(raw.get("tie_word_embeddings", False)),
                     bool(raw.get("attention_bias", raw.get("model_type") == "qwen2")))
    except KeyError as err:
        raise ConfigError(f"{source}: no {err.args[0]!r}, which the memory plan needs") from None


def model_shape(cfg: RunConfig) -> tuple[Shape, str]:
    """(shape, where it came from): model.path's config.json, else model.config_json (relative paths from the
    working directory, like every path in a config), else the tiny model's ModelConfig fields."""
    model = cfg.model
    if model.path is None and model.config_json is None:
        from raypipe.data.tiny_model import VOCAB_CAP

        shape = Shape(model.hidden_size, model.intermediate_size, model.num_layers, model.num_heads,
                      model.num_heads, model.hidden_size // model.num_heads, VOCAB_CAP, False, False)
        return shape, f"the tiny model (model.* fields; vocabulary: the tokenizer's cap, {VOCAB_CAP})"
    path, key = ((Path(model.path) / "config.json", "model.path") if model.path
                 else (Path(str(model.config_json)), "model.config_json"))
    if not path.is_file():
        raise ConfigError(f"{key}: {path} not found (the memory plan reads the model's config.json)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from None
    return shape_from_config_json(raw, str(path)), str(path)


def layer_parameters(s: Shape) -> int:
    """One decoder layer: q, k, v, o projections (+ q/k/v bias), gate/up/down MLP, two RMSNorm weights."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    bias = q + 2 * kv if s.qkv_bias else 0
    return s.hidden * (q + 2 * kv) + bias + q * s.hidden + 3 * s.hidden * s.intermediate + 2 * s.hidden


def parameter_count(s: Shape) -> int:
    """P = embeddings V*h (+ a separate lm_head V*h unless tied) + L layers + the final norm h."""
    return s.vocab * s.hidden * (1 if s.tied else 2) + s.layers * layer_parameters(s) + s.hidden


def _shard(n: int, parts: int) -> int:
    return -(-n // parts)


def model_state_bytes(params: int, zero_stage: int, workers: int, bf16: bool,
                      offload: bool) -> tuple[int, int, int]:
    """(weights, gradients, optimizer states) per GPU. Mixed bf16: 2-byte weights and gradients, fp32 master
    weights + Adam m and v = 12 bytes; fp32: 4 + 4 + 8. ZeRO-1 shards the optimizer states over the workers,
    ZeRO-2 the gradients too, ZeRO-3 the weights too; CPU offload (ZeRO 1-3) moves the optimizer states off
    the GPU."""
    weight, grad, optim = (2, 2, 12) if bf16 else (4, 4, 8)
    shards = [workers if zero_stage >= k else 1 for k in (3, 2, 1)]
    optimizer = 0 if offload else _shard(optim * params, shards[2])
    return _shard(weight * params, shards[0]), _shard(grad * params, shards[1]), optimizer


def activation_bytes(s: Shape, tokens: int, value_bytes: int, checkpointing: bool) -> int:
    """What a micro-batch of `tokens` keeps for the backward pass.

    Per layer and token: Korthikanti et al. 2022 (sbh(34 + 5as/h) for a GPT layer at 2 bytes a value, no
    sequence parallelism) adapted to a Llama/Qwen2 layer: no dropout masks; RMSNorm; SDPA/flash attention,
    which keeps Q, K, V, its output and a per-head log-sum-exp but never the s x s scores (the 5as/h term
    goes); GQA's narrower K, V; a SwiGLU MLP of width f. With e bytes a value, q = heads*head_dim and
    kv = kv_heads*head_dim:
        both norms' inputs and outputs 4h + Q q + K, V 2kv + attention output q + gate, up, SiLU(gate)
        and their product 4f  =  e(4h + 2q + 2kv + 4f) per layer    (Qwen2.5-7B in bf16: 196,608 bytes)
    Gradient checkpointing (per decoder layer, as transformers does) keeps each layer's input, e*h, and
    rebuilds one layer's activations at a time in the backward: L*e*h + e(4h + 2q + 2kv + 4f) per token.
    """
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer = value_bytes * (4 * s.hidden + 2 * q + 2 * kv + 4 * s.intermediate)
    per_token = s.layers * value_bytes * s.hidden + layer if checkpointing else s.layers * layer
    return tokens * per_token


def logit_bytes(tokens: int, vocab: int, chunk_tokens: int) -> int:
    """One fp32 copy of the logits live at once: all `tokens` of the micro-batch, or `chunk_tokens` of them
    when log-probs are computed a chunk at a time (train.logits_chunk_tokens > 0)."""
    return (min(tokens, chunk_tokens) if chunk_tokens > 0 else tokens) * vocab * 4


def kv_bytes_per_token(s: Shape, value_bytes: int, tensor_parallel: int = 1) -> int:
    """KV cache per token on one GPU: 2 (K and V) x layers x kv_heads x head_dim x bytes; tensor parallelism
    splits the KV heads (vLLM replicates them when there are fewer heads than GPUs)."""
    return 2 * s.layers * _shard(s.kv_heads, tensor_parallel) * s.head_dim * value_bytes


@dataclass(frozen=True)
class StagePlan:
    """One stage's estimate per GPU, in bytes."""

    stage: str
    gpus: int
    slack: int
    """Bytes to spare (negative: short by that much): the GPU's memory minus the total, or for the engines
    the KV cache minus one engine.max_model_len sequence's."""
    detail: str
    """What the figures assume (the batch, or the KV cache's size)."""
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    logits: int = 0
    kv: int = 0
    other: int = 0
    problem: str = ""
    """Why it does not fit; empty when it does."""

    @property
    def total(self) -> int:
        return (self.weights + self.grads + self.optimizer + self.activations + self.logits + self.kv
                + self.other)


@dataclass(frozen=True)
class Plan:
    source: str
    """Where the model's shape came from."""
    shape: Shape
    params: int
    gpu_bytes: int
    stages: list[StagePlan]
    """The engines first: they hold their GPUs for the whole run, beside each other stage."""
    on_gpu: bool
    """train.use_gpu: `raypipe run` refuses what does not fit."""
    colocated: bool = False
    """engine.colocate: the engines sleep while the other stages use their GPUs."""


def _gib(n: int) -> str:
    return f"{n / GiB:.1f}"


def _train_stage(cfg: RunConfig, s: Shape, name: str, batch_size: int, max_length: int,
                 seqs: int) -> StagePlan:
    """A DeepSpeed job: model states, one micro-batch's activations and logits (every row at max_length, the
    worst case), and besides CUDA's allowance, under ZeRO-3, the whole parameters it gathers to use them: the
    layer at work and the one prefetched, or the embedding/lm_head matrix when larger."""
    t, params = cfg.train, parameter_count(s)
    per_worker = max(1, batch_size // t.num_workers)
    rows = min(t.micro_batch_size or per_worker, per_worker)
    tokens, value = rows * seqs * max_length, 2 if t.bf16 else 4
    states = model_state_bytes(params, t.zero_stage, t.num_workers, t.bf16, t.offload_optimizer)
    gathered = (max(layer_parameters(s), s.vocab * s.hidden) + layer_parameters(s)) * value
    setup = (f"{rows} rows x {seqs} seq x {max_length} tokens per pass, ZeRO-{t.zero_stage} over "
             f"{t.num_workers}, {'bf16' if t.bf16 else 'fp32'}{', offload' if t.offload_optimizer else ''}"
             f"{', checkpointing' if t.gradient_checkpointing else ''}")
    plan = StagePlan(name, t.num_workers, 0, setup, *states,
                     activation_bytes(s, tokens, value, t.gradient_checkpointing),
                     TRAIN_LOGIT_COPIES * logit_bytes(tokens, s.vocab, t.logits_chunk_tokens),
                     other=CUDA_ALLOWANCE + (gathered if t.zero_stage == 3 else 0))
    return _against_memory(plan, t.gpu_memory_gib)


def _against_memory(plan: StagePlan, gpu_gib: float) -> StagePlan:
    slack = int(gpu_gib * GiB) - plan.total
    over = f"{plan.stage}: {_gib(plan.total)} GiB per GPU, more than train.gpu_memory_gib={gpu_gib:g}"
    return replace(plan, slack=slack, problem="" if slack >= 0 else over)


def _reference_stage(cfg: RunConfig, s: Shape, max_length: int, sides: int) -> StagePlan:
    """Frozen scoring: weights in the training dtype; without gradients only one layer's working set is
    live (hidden states in and out, 2h, and the MLP's gate, up and product, 3f)."""
    ref = cfg.reference
    value, tokens = 2 if cfg.train.bf16 else 4, ref.batch_size * sides * max_length
    plan = StagePlan("reference", math.ceil(ref.num_actors * ref.num_gpus), 0,
                     f"{ref.batch_size} rows x {sides} seq x {max_length} tokens per batch",
                     parameter_count(s) * value,
                     activations=tokens * value * (2 * s.hidden + 3 * s.intermediate),
                     logits=SCORE_LOGIT_COPIES * logit_bytes(tokens, s.vocab, cfg.train.logits_chunk_tokens),
                     other=CUDA_ALLOWANCE)
    return _against_memory(plan, cfg.train.gpu_memory_gib)


def _sample_stage(cfg: RunConfig, s: Shape) -> StagePlan:
    """vLLM engines take engine.gpu_memory_utilization of each GPU: the weights (split by tensor
    parallelism), the CUDA allowance, and a KV cache in the rest."""
    e, tp = cfg.engine, cfg.engine.tensor_parallel_size
    if e.dtype not in DTYPE_BYTES:
        raise ConfigError(f"engine.dtype={e.dtype!r}: the plan knows {sorted(DTYPE_BYTES)}")
    value = DTYPE_BYTES[e.dtype]
    weights, per_token = _shard(parameter_count(s) * value, tp), kv_bytes_per_token(s, value, tp)
    budget = int(e.gpu_memory_utilization * cfg.train.gpu_memory_gib * GiB)
    kv = max(0, budget - weights - CUDA_ALLOWANCE)
    slack = kv - e.max_model_len * per_token
    detail = (f"KV cache {kv // per_token:,} tokens ({per_token:,} B each); a {e.max_model_len}-token "
              f"sequence needs {_gib(e.max_model_len * per_token)} GiB")
    room = f"engine.gpu_memory_utilization x {cfg.train.gpu_memory_gib:g} GiB = {_gib(budget)} GiB"
    if s.heads % tp:
        problem = f"engine.tensor_parallel_size={tp} does not divide the model's {s.heads} attention heads"
    elif weights + CUDA_ALLOWANCE > budget:
        problem = (f"the weights ({_gib(weights)} GiB per GPU) and CUDA ({_gib(CUDA_ALLOWANCE)} GiB) "
                   f"exceed {room}")
    elif slack < 0:
        problem = (f"{kv // per_token:,} tokens of KV cache fit in {room}, fewer than one "
                   f"engine.max_model_len={e.max_model_len} sequence")
    else:
        problem = ""
    return StagePlan("sample", e.num_engines * tp, slack, detail, weights, kv=kv, other=CUDA_ALLOWANCE,
                     problem=f"sample: {problem}" if problem else "")


def _stages(cfg: RunConfig, s: Shape) -> list[StagePlan]:
    """Every stage that holds a model on a GPU: the engines, then the rest in the order they first run."""
    from raypipe.methods import METHODS

    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} trains nothing: `raypipe plan` covers the round methods")
    method = METHODS[cfg.method]
    settings = method.settings(cfg)
    seqs = {"sft": 1, "preference": 2, "aft": 1 + cfg.aft.max_candidates}[method.objective(cfg).name]
    stages = [_sample_stage(cfg, s)]
    if cfg.warmup.max_steps:
        stages.append(_train_stage(cfg, s, "warmup", cfg.warmup.optim.batch_size, cfg.warmup.max_length, 1))
    if method.reference:
        stages.append(_reference_stage(cfg, s, settings.max_length, seqs))
    stages.append(_train_stage(cfg, s, "train", settings.optim.batch_size, settings.max_length, seqs))
    if cfg.control.enabled and cfg.method != "sft":
        stages.append(_train_stage(cfg, s, "control", cfg.sft.optim.batch_size, cfg.sft.max_length, 1))
    return stages


def _changes(cfg: RunConfig, s: Shape, stage: StagePlan) -> list[list[str]]:
    """Candidate overrides for a stage that does not fit, each to be tried alone (`_hints` drops those that
    do not help)."""
    t, e = cfg.train, cfg.engine
    if stage.stage == "sample":
        wider = 2 * e.tensor_parallel_size
        shorter = [[f"engine.max_model_len={e.max_model_len // 2}"]] if stage.kv else []  # needs some KV
        tensor_parallel = [f"engine.tensor_parallel_size={wider}", f"engine.num_gpus={wider}"]
        return ([tensor_parallel] if s.heads % wider == 0 else []) + [
            ["engine.gpu_memory_utilization=0.95"], ["engine.dtype=bfloat16"]] + shorter
    chunk = [f"train.logits_chunk_tokens={TrainConfig.logits_chunk_tokens}"]
    if stage.stage == "reference":
        from raypipe.methods import METHODS

        return [chunk, ["train.bf16=true"], [f"reference.batch_size={max(1, cfg.reference.batch_size // 2)}"],
                [f"{cfg.method}.max_length={METHODS[cfg.method].settings(cfg).max_length // 2}"]]
    zero3 = [] if t.zero_stage == 3 else ["train.zero_stage=3"]
    return [zero3 + [f"train.num_workers={2 * t.num_workers}"], zero3,
            ([] if t.zero_stage else ["train.zero_stage=2"]) + ["train.offload_optimizer=true"],
            ["train.gradient_checkpointing=true"], ["train.micro_batch_size=1"], chunk]


def _with(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    merged = OmegaConf.merge(OmegaConf.structured(cfg), OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _hints(cfg: RunConfig, s: Shape, stage: StagePlan) -> str:
    """The candidate changes that help this stage, each with the estimate it gives, the best first."""
    tried = []
    for change in filter(None, _changes(cfg, s, stage)):
        after = next(p for p in _stages(_with(cfg, change), s) if p.stage == stage.stage)
        if after.slack > stage.slack:
            figure = after.detail.split(";")[0] if stage.stage == "sample" else f"{_gib(after.total)} GiB"
            fits = "" if after.problem else ", fits"
            tried.append((after.slack, f"{' '.join(change)} -> {figure}{fits}"))
    return "; ".join(text for _, text in sorted(tried, reverse=True)) or "nothing tried alone helps"


def plan_run(cfg: RunConfig) -> Plan:
    """The run's plan; each stage that does not fit carries its reason and the changes that would help."""
    shape, source = model_shape(cfg)
    stages = [replace(p, problem=f"{p.problem}. Try: {_hints(cfg, shape, p)}") if p.problem else p
              for p in _stages(cfg, shape)]
    return Plan(source, shape, parameter_count(shape), int(cfg.train.gpu_memory_gib * GiB), stages,
                cfg.train.use_gpu, cfg.engine.colocate)


def check_fits(plan: Plan) -> None:
    """Refuse (ConfigError, one line per stage) a plan in which a stage does not fit its GPUs."""
    problems = [p.problem for p in plan.stages if p.problem]
    if problems:
        raise ConfigError("the memory plan does not fit (`raypipe plan` prints it):\n  "
                          + "\n  ".join(problems))


def print_plan(plan: Plan) -> None:
    """A table of GiB per GPU (under 100 columns), what each row assumes, and the GPUs held at once."""
    s, console = plan.shape, terminal()
    console.print(f"model: {plan.source}, {plan.params:,} parameters\n({s.layers} layers, hidden {s.hidden}, "
                  f"{s.heads} heads / {s.kv_heads} KV, MLP {s.intermediate}, vocabulary {s.vocab}"
                  f"{', tied' if s.tied else ''}); GiB per GPU of {plan.gpu_bytes / GiB:g}:", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 1))
    for name in ("stage", "GPUs", "weights", "grads", "optim", "activ", "logits", "KV", "other", "total",
                 "fits"):
        table.add_column(name, justify="left" if name == "stage" else "right")
    for p in plan.stages:
        figures = (p.weights, p.grads, p.optimizer, p.activations, p.logits, p.kv, p.other, p.total)
        table.add_row(p.stage, str(p.gpus), *map(_gib, figures), "no" if p.problem else "yes")
    console.print(table)
    for p in plan.stages:
        console.print(f"{p.stage}: {p.detail}", highlight=False)
    engines, others = plan.stages[0].gpus, max((p.gpus for p in plan.stages[1:]), default=0)
    if plan.colocated:
        console.print(f"GPUs held at once: {max(engines, others)} (engine.colocate: the engines sleep while the "
                      "other stages use their GPUs)", highlight=False)
    else:
        console.print(f"GPUs held at once: {engines + others} (the engines hold {engines} for the whole run, "
                      "beside each other stage's)", highlight=False)
    if not plan.on_gpu:
        console.print("train.use_gpu=false: the figures are as if on GPUs; `raypipe run` checks them for GPU "
                      "runs only", highlight=False)
