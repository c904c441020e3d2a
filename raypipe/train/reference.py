"""Reference log-probabilities for DPO, computed once per round by a Ray Data pass over the frozen model.

The pass truncates and batches rows exactly as the training loop does (collate.py) and sums the same masked
log-probabilities, so at step 0 the policy reproduces these numbers and the DPO loss is exactly log(2).
Precomputing means training holds one model instead of two and runs one forward per pair instead of two.
"""

from __future__ import annotations

import pyarrow as pa
import ray.data
import torch

from raypipe.train.collate import pad_sequences, truncate_left
from raypipe.train.losses import sequence_logps


class _ReferenceScorer:
    """Ray Data actor: loads the frozen model once, then scores batches of pairs."""

    def __init__(self, model_dir: str, max_length: int, use_gpu: bool, num_threads: int) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not use_gpu:
            torch.set_num_threads(num_threads)
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_length = max_length

    def _rows(self, table: pa.Table, side: str) -> tuple[list[list[int]], list[list[int]]]:
        pairs = [truncate_left(i, m, self.max_length)
                 for i, m in zip(table[f"{side}_ids"].to_pylist(), table[f"{side}_mask"].to_pylist())]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @torch.inference_mode()
    def __call__(self, table: pa.Table) -> pa.Table:
        chosen_ids, chosen_mask = self._rows(table, "chosen")
        rejected_ids, rejected_mask = self._rows(table, "rejected")
        ids, attn, mask = pad_sequences(chosen_ids + rejected_ids, chosen_mask + rejected_mask, self.pad_id)
        ids, attn, mask = ids.to(self.device), attn.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logps = sequence_logps(logits, ids, mask).double().cpu()
        n = len(chosen_ids)
        table = table.append_column("ref_chosen_logps", pa.array(logps[:n].tolist(), pa.float64()))
        return table.append_column("ref_rejected_logps", pa.array(logps[n:].tolist(), pa.float64()))


def add_reference_logps(pairs: ray.data.Dataset, model_dir: str, batch_size: int = 32, num_actors: int = 1,
                        use_gpu: bool = False, max_length: int = 256, num_cpus: int = 1) -> ray.data.Dataset:
    """`pairs` plus `ref_chosen_logps` / `ref_rejected_logps`: summed log-probs of the masked step tokens.

    `max_length` must equal the training job's (TrainJob.max_length): truncation changes the context, hence the
    log-probabilities. `num_cpus` is per actor and is also its torch thread count on CPU.
    """
    return pairs.map_batches(
        _ReferenceScorer,
        fn_constructor_kwargs={"model_dir": model_dir, "max_length": max_length, "use_gpu": use_gpu,
                               "num_threads": num_cpus},
        batch_size=batch_size,
        batch_format="pyarrow",
        concurrency=num_actors,
        num_cpus=num_cpus,
        num_gpus=1 if use_gpu else 0,
    )
