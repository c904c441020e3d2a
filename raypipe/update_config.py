"""The settings of a training update: the optimiser, and each method's section of the run config.

Split out of raypipe/config.py (which composes them into RunConfig) so each method's knobs sit together, with
the docstrings `raypipe config show` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OptimConfig:
    """Optimiser and schedule for one training stage (AdamW, linear warmup, cosine decay)."""

    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.05
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    batch_size: int = 64
    """Global batch: sequences (SFT) or pairs (DPO) per optimiser step."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft) instead of full fine-tuning; the export merges them, so every round still hands
    a plain Hugging Face checkpoint to the engines."""

    rank: int = 0
    """Adapter rank r; 0 trains every weight (full fine-tuning). LEMA published: 64."""
    alpha: float = 16.0
    """Scaling numerator: the update is (alpha / rank) * B A. LEMA published: 16."""
    dropout: float = 0.05
    """Dropout on the adapter input. LEMA published: 0.05."""
    target_modules: str = "all-linear"
    """Which layers get adapters: 'all-linear' (LEMA, QLoRA) or a comma-separated list of module names."""


@dataclass
class UpdateConfig:
    """What every method's round update has: optimiser, passes over the round's data, row length."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule of the update."""
    epochs: int = 1
    """Passes over the round's training set (ignored when `round_steps` is set)."""
    max_length: int = 256
    """Longest training row in tokens; longer rows lose tokens from the left (the end is what is scored)."""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """Full fine-tuning (rank 0, the default) or LoRA adapters (ZeRO stage 0-2)."""


def _preference_optim() -> OptimConfig:
    return OptimConfig(lr=2e-5, warmup_steps=5, batch_size=32, min_lr_ratio=0.0)


def _continued_sft_optim() -> OptimConfig:
    return OptimConfig(lr=1e-4, warmup_steps=0, batch_size=64)


@dataclass
class SFTConfig(UpdateConfig):
    """Continued SFT on the worked solutions: the `sft` method (VFT), and the control every method is compared with.
    The control trains exactly as many optimiser steps as the method it accompanies."""

    optim: OptimConfig = field(default_factory=_continued_sft_optim)


@dataclass
class RFTConfig(UpdateConfig):
    """Rejection-sampling fine-tuning: SFT on the worked solutions plus the policy's own correct chains."""

    optim: OptimConfig = field(default_factory=_continued_sft_optim)
    max_per_question: int = 4
    """Distinct correct chains kept per pool question."""


@dataclass
class PreferenceConfig(UpdateConfig):
    """A DPO-family update (dpo and ipo on whole answers, stepdpo on single steps)."""

    optim: OptimConfig = field(default_factory=_preference_optim)
    beta: float = 0.1
    """DPO temperature (Step-DPO paper: 0.4-0.5 on 7B). For ipo the target margin is 1/(2 beta) in average
    log-prob units, so ipo wants a larger beta."""
    epochs: int = 2
    nll_weight: float = 0.0
    """Weight of an extra NLL term on the chosen tokens (RPO-style); 0 is the pure preference loss."""
    max_length: int = 160
    max_pairs_per_question: int = 4
    """dpo / ipo: (correct, wrong) whole-answer pairs per question (stepdpo uses branch.max_pairs_per_wrong)."""


@dataclass
class AFTConfig(UpdateConfig):
    """Alignment fine-tuning: L_VFT + weight * L_CA over each question's sampled chains (METHODS.md section 2)."""

    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, warmup_steps=5, batch_size=32,
                                                                   min_lr_ratio=0.0))
    constraint: str = "bc"
    """'dc' (detached: only positives move), 'bc' (boundary), 'rank' (boundary over a ranking: positives, then
    negatives by how many steps they got right), or 'none' (unconstrained; an ablation that degenerates)."""
    beta: float = 0.5
    """Boundary margin B = min positive score - beta (bc, rank), in average log-prob units."""
    weight: float = 1.0
    """lambda in L_VFT + lambda * L_CA."""
    mle_on_positives: bool = False
    """Also train NLL on the positive chains (RFT + alignment); otherwise NLL on worked solutions only."""
    epochs: int = 2
    max_length: int = 160
    max_candidates: int = 8
    """Distinct sampled chains kept per question."""


@dataclass
class ControlConfig:
    """The honest baseline: SFT continued on its own data (`sft` settings) for the same steps as the method."""

    enabled: bool = True
    """Train and evaluate the control every round (never for method 'sft', which is the control)."""
