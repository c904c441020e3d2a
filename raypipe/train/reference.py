"""Scoring sequences with a frozen model by a Ray Data pass: DPO's reference log-probs (once per round) and
AFT's assessment scores.

The pass truncates and batches rows exactly as the training loop does (collate.py), loads the weights in the
training dtype and computes log-probs by the same function (logprobs.py), so at step 0 the policy reproduces
these numbers and the DPO loss is exactly log(2).
Precomputing means training holds one model instead of two and runs one forward per pair instead of two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import ray.data
import torch

from raypipe.train.collate import pad_sequences, truncate_left
from raypipe.train.logprobs import TokenLogProbs
from raypipe.train.losses import sequence_logps


class _SequenceScorer:
    """Ray Data actor: loads the frozen model once, then adds `<prefix><side>_logps` for each side's
    `<side>_ids` / `<side>_mask` columns (all sides of a batch in one forward pass)."""

    def __init__(self, model_dir: str, max_length: int, use_gpu: bool, num_threads: int, sides: tuple[str, ...],
                 prefix: str, average: bool, bf16: bool, logits_chunk_tokens: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not use_gpu:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        # safetensors only, and never a model folder's own code (engine.trust_remote_code covers generation only)
        dtype = torch.bfloat16 if bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
        self.model = TokenLogProbs(model, logits_chunk_tokens).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_length, self.sides, self.prefix, self.average = max_length, sides, prefix, average

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        ids: list[list[int]] = []
        masks: list[list[int]] = []
        for side in self.sides:
            for i, m in zip(table[f"{side}_ids"].to_pylist(), table[f"{side}_mask"].to_pylist()):
                row_ids, row_mask = truncate_left(i, m, self.max_length)
                ids.append(row_ids)
                masks.append(row_mask)
        batch_ids, attn, mask = pad_sequences(ids, masks, self.pad_id)
        batch_ids, attn, mask = batch_ids.to(self.device), attn.to(self.device), mask.to(self.device)
        token_logps = self.model(input_ids=batch_ids, attention_mask=attn, loss_mask=mask)
        logps = sequence_logps(token_logps, mask, average=self.average).double().cpu().tolist()
        n = table.num_rows
        for k, side in enumerate(self.sides):
            table = table.append_column(f"{self.prefix}{side}_logps", pa.array(logps[k * n:(k + 1) * n], pa.float64()))
        return table


def score_sequences(rows: ray.data.Dataset, model_dir: str, sides: tuple[str, ...], prefix: str = "",
                    average: bool = False, batch_size: int = 32, num_actors: int = 1, use_gpu: bool = False,
                    max_length: int = 256, num_cpus: int = 1, num_gpus: float = 1.0, bf16: bool = False,
                    logits_chunk_tokens: int = 4096) -> ray.data.Dataset:
    """`rows` plus `<prefix><side>_logps` per side: the summed (or token-averaged) log-probs of the masked tokens
    under the frozen model in `model_dir`. `num_cpus` is per actor and is also its torch thread count on CPU;
    `num_gpus` is per actor when `use_gpu`. `bf16` and `logits_chunk_tokens` must be the training job's
    (TrainConfig), so the numbers match the policy's."""
    return rows.map_batches(
        _SequenceScorer,
        fn_constructor_kwargs={"model_dir": model_dir, "max_length": max_length, "use_gpu": use_gpu,
                               "num_threads": num_cpus, "sides": sides, "prefix": prefix, "average": average,
                               "bf16": bf16, "logits_chunk_tokens": logits_chunk_tokens},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=num_actors,
        num_cpus=num_cpus,
        num_gpus=num_gpus if use_gpu else 0,
    )


def add_reference_logps(pairs: ray.data.Dataset, model_dir: str, batch_size: int = 32, num_actors: int = 1,
                        use_gpu: bool = False, max_length: int = 256, num_cpus: int = 1, num_gpus: float = 1.0,
                        bf16: bool = False, logits_chunk_tokens: int = 4096) -> ray.data.Dataset:
    """`pairs` plus `ref_chosen_logps` / `ref_rejected_logps`: summed log-probs of the masked tokens.

    `max_length` must equal the training job's (TrainJob.max_length): truncation changes the context, hence the
    log-probabilities.
    """
    return score_sequences(pairs, model_dir, ("chosen", "rejected"), prefix="ref_", batch_size=batch_size,
                           num_actors=num_actors, use_gpu=use_gpu, max_length=max_length, num_cpus=num_cpus,
                           num_gpus=num_gpus, bf16=bf16, logits_chunk_tokens=logits_chunk_tokens)


def write_reference_logps(pairs_path: str, out_dir: Path, model_dir: str, **scoring: Any) -> None:
    """The reference stage: the pairs at `pairs_path` with their reference log-probs (add_reference_logps;
    `scoring` is its keywords) as one parquet file in `out_dir`.

    The file's row order is the training set's batch order, and Ray Data lets a block that finishes early overtake
    one still in flight: two runs of one stage then trained on the same pairs in different batches and ended with
    different models. `preserve_order` makes that rarer but did not prevent it in every run (a known bug, see the
    xfail test in tests/test_trainer.py); sorting the output by a row index is the fix still to make.
    """
    pairs = ray.data.read_parquet(pairs_path)
    pairs.context.execution_options.preserve_order = True  # not always enough: see its test
    add_reference_logps(pairs, model_dir, **scoring).repartition(1).write_parquet(str(out_dir))
