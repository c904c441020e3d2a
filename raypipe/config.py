"""Structured configuration: every knob of a run, documented where it is declared.

A run is configured by one YAML file under `conf/` plus dotted command-line overrides
(`raypipe run conf/quickstart.yaml train.zero_stage=3`). The YAML is merged onto these dataclasses, so a
misspelt key fails loudly with its name instead of being ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from raypipe.data_config import LEMAConfig, ReAlignConfig
from raypipe.files import write_atomic
from raypipe.runtime_config import EngineConfig, ReferenceConfig, TrainConfig
from raypipe.task_config import TaskConfig
from raypipe.update_config import AFTConfig, ControlConfig, OptimConfig, PreferenceConfig, RFTConfig, SFTConfig


T = TypeVar("T")


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message says which key and where."""


@dataclass
class ModelConfig:
    """The starting policy: an existing Hugging Face directory, or the tiny model raypipe builds itself."""

    path: str | None = None
    """Local HF model directory (weights + tokenizer). None builds the tiny Llama model and tokenizer."""
    config_json: str | None = None
    """A config.json to plan with while model.path is not set (recipes for models not on this machine);
    model.path's own config.json wins when set. Relative to the working directory, like every path in a
    config."""
    hidden_size: int = 128
    """Tiny model only: hidden width. Head size = hidden_size / num_heads must be >= 32 for vLLM on CPU."""
    num_layers: int = 4
    """Tiny model only: decoder layers."""
    num_heads: int = 4
    """Tiny model only: attention heads (no grouped-query attention)."""
    intermediate_size: int = 512
    """Tiny model only: MLP width."""
    max_position_embeddings: int = 256
    """Tiny model only: longest sequence (prompt + completion) in tokens."""
    init_seed: int = 0
    """Tiny model only: seed of the random initialisation (learning is a seed-dependent phase transition)."""
    extra_corpus: list[str] = field(default_factory=list)
    """Tiny model only: text formats beyond the task's that the tokenizer learns words for: ['lema'] (the
    correction format), so those examples fit the context. Part of the tokenizer: set it before round 0."""


@dataclass
class SamplingConfig:
    """Error collection: N chains of thought per question from the answer-only pool."""

    questions_per_round: int = 400
    """Pool questions sampled each round (each round takes fresh ones while the pool lasts)."""
    samples_per_question: int = 8
    """N chains per question."""
    temperature: float = 0.8
    """Sampling temperature (Step-DPO: 0.8)."""
    top_p: float = 0.95
    """Nucleus sampling (Step-DPO: 0.95)."""
    max_new_tokens: int = 96
    """Cap on a whole chain of thought, in tokens."""


@dataclass
class BranchConfig:
    """Step-level branching: find the first wrong step of a wrong chain and correct alternatives for it."""

    localiser: str = "mc"
    """'mc' (Monte-Carlo rollouts, no external model) or 'exact' (the synthetic task's step verifier)."""
    search: str = "binary"
    """MC search over prefixes: 'binary' (~log2(n)*K rollouts) or 'linear' (n*K, finds the smallest k)."""
    rollouts: int = 8
    """K continuations per prefix (Math-Shepherd: 8; OmegaPRM: 16)."""
    rectify_samples: int = 8
    """Continuations from the last correct prefix when the localiser did not already sample them (exact)."""
    max_wrong_per_question: int = 2
    """Wrong chains localised per question (distinct ones first); bounds branching cost."""
    max_pairs_per_wrong: int = 2
    """Distinct correct steps kept per wrong step (one wrong chain may yield several pairs)."""


@dataclass
class WarmupConfig:
    """Round 0's warm-up SFT (the tiny model, or any model that needs it): train on the worked solutions until dev
    accuracy is mid-band. Its stage is `round_0/sft`."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser for SFT."""
    max_steps: int = 4000
    """Hard cap on optimiser steps (the cosine schedule spans it); 0 skips SFT (a model that needs none)."""
    max_length: int = 256
    """Longest training row (prompt + worked solution) in tokens; longer rows lose tokens from the left."""
    eval_every_steps: int = 100
    """Greedy dev-set evaluation interval."""
    target_accuracy: float = 0.5
    """Stop once dev accuracy reaches this (the 20-80% band leaves room for preference methods)."""
    plateau_evals: int = 6
    """Stop when dev accuracy has not improved by min_improvement in this many evaluations..."""
    min_improvement: float = 0.01
    """...and accuracy is above min_accuracy (a plateau at 0% is the pre-transition phase, not a plateau)."""
    min_accuracy: float = 0.2
    """Lower end of the acceptable band for a plateau stop."""
    seed: int = 0
    """Seed of SFT's data order. Separate from the run's `seed`, so runs that differ only in seed (a comparison)
    share one SFT checkpoint."""


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy decoding, same grader."""

    max_new_tokens: int = 96
    """Cap on the generated answer."""
    split: str = "test"
    """Split every round's evaluation grades: 'test' for reported figures; 'dev' for selection runs (choosing
    learning rate, beta, rounds ... by comparing runs on dev, so the test split is read only for the final
    figures)."""
    assessment_questions: int = 200
    """Dev questions whose sampled chains measure assessment accuracy (AFT paper: share of (right, wrong) chain
    pairs the model scores in the right order) before and after each round; 0 skips it."""


@dataclass
class WandbConfig:
    """Weights & Biases tracking."""

    mode: str = "auto"
    """'auto' (default): WANDB_MODE if set, else 'online' when WANDB_API_KEY is set, else 'offline'. 'offline'
    writes the run under <run>/wandb (`wandb sync` it later), 'online' needs a key (in the environment, never in
    a config), 'disabled' logs nothing."""
    project: str = "raypipe"
    """W&B project."""
    entity: str | None = None
    """W&B team or user."""


@dataclass
class RunConfig:
    """One pipeline run: an initial SFT (tiny model) and R rounds of the chosen method."""

    name: str = "quickstart"
    """Run folder name under output_dir; reusing a name resumes that run."""
    output_dir: str = "runs"
    """Where run folders live."""
    method: str = "stepdpo"
    """Training method of each round: 'sft', 'rft', 'dpo', 'ipo', 'stepdpo', 'aft' or 'lema' (settings in the section
    of the same name); or the data stage 'realign' (section `realign`), which rewrites a
    dataset instead of running rounds."""
    rounds: int = 1
    """Rounds of sample -> grade -> (branch) -> build -> (reference) -> train -> export -> evaluate."""
    round_steps: int | None = None
    """Exact optimiser steps of every round's update, for any method (overrides the section's epochs). Set it to
    compare methods on the same number of steps."""
    seed: int = 0
    """Seed for sampling and training."""
    reuse_runs: bool = True
    """Reuse finished stages with the same fingerprint from other run folders in output_dir instead of computing
    them again (e.g. one SFT checkpoint for every method recipe). Off: every stage of this run is its own."""
    ray_num_cpus: int = 8
    """Logical CPUs for a local ray.init (more than physical: Ray Data's actors are mostly idle)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    branch: BranchConfig = field(default_factory=BranchConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rft: RFTConfig = field(default_factory=RFTConfig)
    dpo: PreferenceConfig = field(default_factory=PreferenceConfig)
    ipo: PreferenceConfig = field(default_factory=lambda: PreferenceConfig(beta=0.5))
    stepdpo: PreferenceConfig = field(default_factory=PreferenceConfig)
    aft: AFTConfig = field(default_factory=AFTConfig)
    lema: LEMAConfig = field(default_factory=LEMAConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    realign: ReAlignConfig = field(default_factory=ReAlignConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Merge a YAML file and dotted overrides onto the defaults; unknown keys are a ConfigError naming them."""
    cfg = load_structured(RunConfig, path, overrides)
    _validate(cfg)
    return cfg


def load_structured(schema: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                    values: tuple[str, dict[str, Any]] | None = None) -> T:
    """`schema`'s defaults, then the YAML file, then `values` (a (source name, mapping) pair, e.g. the `args:` of a
    Serve config), then dotted overrides; every mistake is a ConfigError that says where and which key."""
    merged: DictConfig = OmegaConf.structured(schema)
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as err:  # yaml's scanner and parser errors share no useful base class
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if values is not None:
        layers.append((values[0], OmegaConf.create(values[1])))
    if overrides:
        layers.append(("command line", OmegaConf.from_dotlist(overrides)))
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except ConfigKeyError as err:
            secret = re.search(r"(^|_)(api_?key|key|token|secret|password)$", str(err.key).lower()) is not None
            hint = (" (keys and tokens are read from environment variables only, never from a config: e.g. "
                    "`api_key_env` names the variable that holds a model endpoint's key)") if secret else ""
            raise ConfigError(f"{source}: unknown config key '{err.full_key}'{hint}") from None
        except ValidationError as err:
            raise ConfigError(f"{source}: bad value for '{err.full_key}': {err.msg}") from None
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def _validate(cfg: RunConfig) -> None:
    choices = {
        "engine.backend": (cfg.engine.backend, {"vllm", "hf"}),
        "branch.localiser": (cfg.branch.localiser, {"mc", "exact"}),
        "branch.search": (cfg.branch.search, {"binary", "linear"}),
        "method": (cfg.method, {"sft", "rft", "dpo", "ipo", "stepdpo", "aft", "lema", "realign"}),
        "aft.constraint": (cfg.aft.constraint, {"dc", "bc", "rank", "none"}),
        "eval.split": (cfg.eval.split, {"test", "dev"}),
        "wandb.mode": (cfg.wandb.mode, {"auto", "offline", "online", "disabled"}),
        "lema.corrector": (cfg.lema.corrector, {"exact", "model"}),
        "model.extra_corpus": (tuple(cfg.model.extra_corpus), {(), ("lema",)}),
        "realign.classifier": (cfg.realign.classifier, {"keyword", "model"}),
        "realign.rewriter": (cfg.realign.rewriter, {"model", "math_template"}),
        "realign.model.backend": (cfg.realign.model.backend, {"openai", "local"}),
    }
    _validate_engine(cfg)
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {sorted(allowed)}")
    lora_sections = [n for n in ("sft", "rft", "dpo", "ipo", "stepdpo", "aft", "lema") if getattr(cfg, n).lora.rank]
    if lora_sections and cfg.train.zero_stage == 3:
        raise ConfigError(f"{lora_sections[0]}.lora.rank > 0 needs train.zero_stage <= 2 (LoRA under ZeRO-3 is not "
                          "supported here)")
    if cfg.round_steps is not None and cfg.round_steps <= 0:
        raise ConfigError(f"round_steps={cfg.round_steps} must be positive (or null: the section's epochs)")
    if not 0 <= cfg.train.zero_stage <= 3:
        raise ConfigError(f"train.zero_stage={cfg.train.zero_stage} must be 0, 1, 2 or 3")
    if cfg.train.gpu_memory_gib <= 0:
        raise ConfigError(f"train.gpu_memory_gib={cfg.train.gpu_memory_gib} must be positive")
    validate_train(cfg.train)
    if cfg.model.path is None and cfg.model.hidden_size // cfg.model.num_heads < 32:
        raise ConfigError("model.hidden_size / model.num_heads must be >= 32 (vLLM's CPU attention needs it)")
    if not 0 <= cfg.realign.max_rejected_fraction <= 1:
        raise ConfigError(f"realign.max_rejected_fraction={cfg.realign.max_rejected_fraction} must be between 0 "
                          "and 1")
    if cfg.realign.task is not None:
        from raypipe.realign.tasks import load_tasks

        if cfg.realign.task not in load_tasks():
            raise ConfigError(f"realign.task={cfg.realign.task!r} is not one of the 46 task names "
                              "(raypipe/realign/tasks.yaml)")
    _validate_task(cfg)
    bad_ops = set(cfg.task.operations) - {"+", "-", "*"}
    if bad_ops:
        raise ConfigError(f"task.operations has unknown operations {sorted(bad_ops)}; use '+', '-', '*'")


def _validate_engine(cfg: RunConfig) -> None:
    engine = cfg.engine
    if engine.tensor_parallel_size < 1:
        raise ConfigError(f"engine.tensor_parallel_size={engine.tensor_parallel_size} must be >= 1")
    if engine.tensor_parallel_size > 1 and (engine.backend != "vllm"
                                            or engine.num_gpus != engine.tensor_parallel_size):
        raise ConfigError(f"engine.tensor_parallel_size={engine.tensor_parallel_size} needs engine.backend=vllm and "
                          f"engine.num_gpus={engine.tensor_parallel_size} (the engine actor holds its GPUs)")
    if engine.colocate and (engine.backend != "vllm" or not engine.num_gpus or not cfg.train.use_gpu):
        raise ConfigError("engine.colocate needs GPUs: engine.backend=vllm, engine.num_gpus > 0 and "
                          "train.use_gpu=true (vLLM's sleep mode frees GPU memory; on CPU there is none to share)")


def validate_train(train: TrainConfig) -> None:
    """The TrainConfig checks, also run by `run_training` for configs built in code."""
    if train.micro_batch_size is not None and train.micro_batch_size <= 0:
        raise ConfigError(f"train.micro_batch_size={train.micro_batch_size} must be positive (or null)")
    if train.logits_chunk_tokens < 0:
        raise ConfigError(f"train.logits_chunk_tokens={train.logits_chunk_tokens} must be >= 0 "
                          "(0: full logits)")
    if train.offload_optimizer and train.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs train.zero_stage >= 1 (DeepSpeed offloads ZeRO's "
                          "partitioned optimiser states)")


def _validate_task(cfg: RunConfig) -> None:
    task = cfg.task
    if task.source not in ("synthetic", "dataset"):
        raise ConfigError(f"task.source={task.source!r} is not one of ['dataset', 'synthetic']")
    if task.answer_kind is not None and task.answer_kind not in ("gsm8k", "math", "synthetic"):
        raise ConfigError(f"task.answer_kind={task.answer_kind!r} is not one of ['gsm8k', 'math', 'synthetic']")
    if task.source == "synthetic" and task.answer_kind not in (None, "synthetic"):
        raise ConfigError(f"task.answer_kind={task.answer_kind!r}: the synthetic task's answers are graded as "
                          "'synthetic' (set task.source=dataset to read your own files)")
    if task.source == "dataset" and cfg.method != "realign":
        if task.answer_kind is None:
            raise ConfigError("task.answer_kind must be set for task.source=dataset: 'gsm8k' (numbers, `#### N`) "
                              "or 'math' (LaTeX answers, \\boxed{})")
        if not task.test_path:
            raise ConfigError("task.test_path must name the test file for task.source=dataset")
    if task.pairs_path and cfg.method not in ("stepdpo", "dpo", "ipo"):
        raise ConfigError(f"task.pairs_path trains stepdpo, dpo or ipo; method={cfg.method!r} cannot use it")
    if not 0 <= task.max_rejected_fraction <= 1:
        raise ConfigError(f"task.max_rejected_fraction={task.max_rejected_fraction} must be between 0 and 1")
    from raypipe.data.steps import StepSplitter

    try:
        StepSplitter(task.step_delimiter)
    except ValueError as err:
        raise ConfigError(f"task.step_delimiter: {err}") from None


def to_dict(section: Any) -> dict[str, Any]:
    """A config (or section) as plain data, for manifests, W&B and the saved run config."""
    return OmegaConf.to_container(OmegaConf.structured(section), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: Path) -> None:
    """A resolved config (a run's, a comparison's) as YAML, beside what it produced."""
    write_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def describe(section: Any = None, prefix: str = "") -> list[str]:
    """`key: value  # docstring` lines for `raypipe config show`, read from the attribute docstrings.

    `section` is a config instance (default: `RunConfig()`), so a parent's per-field defaults (e.g. ipo's larger
    beta) are the ones shown.
    """
    import ast
    import inspect

    section = RunConfig() if section is None else section
    docs: dict[str, str] = {}
    for cls in reversed([c for c in type(section).__mro__ if hasattr(c, "__dataclass_fields__")]):
        body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    lines: list[str] = []
    for name, value in vars(section).items():
        if hasattr(value, "__dataclass_fields__"):
            lines += describe(value, f"{prefix}{name}.")
        else:
            lines.append(f"{prefix}{name}: {value!r}  # {docs.get(name, '')}")
    return lines
