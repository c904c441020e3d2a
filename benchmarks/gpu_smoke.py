"""GPU smoke run: one full Step-DPO round on one GPU with a 0.5B-parameter model and a 151,936-token vocabulary.

Builds a randomly initialised model of Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV, MLP 4864,
tied embeddings, 151,936-entry vocabulary; as a Llama, without Qwen2's q/k/v biases, so transformers keeps the
task's own tokenizer), then runs `conf/gpu_smoke.yaml` on it: a short warm-up SFT on the embedded task, then one
Step-DPO round (vLLM sampling and branching on CUDA, reference, DeepSpeed bf16 training, evaluation and the
engines' weight refresh), engines and trainer sharing the GPU (`engine.colocate`: vLLM sleeps while training).
A thread polls `nvidia-smi` every 0.2 s; each stage's peak is the highest reading inside its time window.

Prints sampling and training tokens/s, training MFU (6 x parameters x tokens/s over the GPU's dense bf16 peak),
each stage's peak GPU memory next to `raypipe plan`'s estimate, and the weight-refresh seconds; writes it all to
<out>/gpu_smoke.json.

    bash benchmarks/gpu_smoke.sh [--out DIR] [--peak-tflops N]      # needs a CUDA GPU and the `gpu` extra
"""

from __future__ import annotations

import argparse
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "conf" / "gpu_smoke.yaml"
SHAPE = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "vocab_size": 151_936, "max_position_embeddings": 4096,
         "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
"""Qwen2.5-0.5B's published dimensions."""
BF16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "GH200": 989.4, "A100": 312.0, "A800": 312.0,
                    "L40S": 362.1, "L4": 121.0, "A10G": 70.0}
"""Dense bf16 tensor-core peak by GPU name fragment (vendor data sheets, SXM parts); --peak-tflops overrides."""


def build_model(out: Path, corpus: list[str], shape: dict[str, Any], seed: int = 0) -> Path:
    """A randomly initialised model of `shape` in bf16 safetensors, with the task's own tokenizer padded to the
    model's vocabulary (filler entries no text encodes to, so any id the random model samples still decodes)."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from raypipe.data.tiny_model import build_tokenizer, save_model_dir

    tokenizer = build_tokenizer(corpus)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    taken = len(tokenizer)
    vocab.update({f"<|filler_{i}|>": i for i in range(taken, shape["vocab_size"])})
    padded = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                     eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token,
                                     model_max_length=shape["max_position_embeddings"],
                                     chat_template=tokenizer.chat_template)
    config = LlamaConfig(**shape, bos_token_id=padded.eos_token_id, eos_token_id=padded.eos_token_id,
                         pad_token_id=padded.pad_token_id, torch_dtype="bfloat16")
    torch.manual_seed(seed)
    return save_model_dir(LlamaForCausalLM(config).to(torch.bfloat16), padded, out)


@dataclass
class MemoryPoller:
    """`nvidia-smi` readings (unix time, MiB used on GPU 0) every `interval` seconds, in a background thread."""

    interval: float = 0.2
    readings: list[tuple[float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> MemoryPoller:
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "--id=0"], capture_output=True, text=True, check=True).stdout
            self.readings.append((time.time(), float(out.strip().splitlines()[0])))
            self._stop.wait(self.interval)


def stage_windows(run_dir: Path) -> dict[str, tuple[float, float]]:
    """label -> (start, end) unix times of every executed stage, from its manifest (`finished_at` is to the
    second, so each window is widened by a second at its end)."""
    windows = {}
    for path in sorted(run_dir.glob("round_*/*/manifest.json")):
        manifest = json.loads(path.read_text())
        end = datetime.strptime(manifest["finished_at"], "%Y-%m-%dT%H:%M:%S").timestamp() + 1.0
        windows[f"{path.parent.parent.name}/{path.parent.name}"] = (end - 1.0 - manifest["seconds"], end)
    return windows


def peaks(readings: list[tuple[float, float]], windows: dict[str, tuple[float, float]]) -> dict[str, float | None]:
    """The highest reading (MiB) inside each window; None where no reading fell in it."""
    return {label: max((mib for t, mib in readings if start <= t <= end), default=None)
            for label, (start, end) in windows.items()}


def peak_tflops(name: str, override: float | None) -> float:
    if override:
        return override
    for fragment, tflops in BF16_PEAK_TFLOPS.items():
        if fragment in name:
            return tflops
    raise SystemExit(f"no bf16 peak known for {name!r}: pass --peak-tflops")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_smoke")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_smoke needs a CUDA GPU (and the `gpu` extra: vllm, deepspeed)")
    from raypipe.config import load_config
    from raypipe.data.synthetic import load_splits
    from raypipe.pipeline import Pipeline
    from raypipe.plan import parameter_count, plan_run, shape_from_config_json

    gpu = torch.cuda.get_device_name(0)
    base = load_config(RECIPE, [f"output_dir={args.out}"])
    splits = load_splits(base.task)
    started = time.perf_counter()
    model = build_model(args.out / "model", [p.prompt + p.solution for p in splits["sft"]], SHAPE)
    build_seconds = time.perf_counter() - started
    cfg = load_config(RECIPE, [f"output_dir={args.out}", f"model.path={model}"])
    plan = {p.stage: p.total / 2**20 for p in plan_run(cfg).stages}
    with MemoryPoller() as poller:
        summary = Pipeline(cfg).run()
    run_dir = cfg.run_dir
    stage_peaks = peaks(poller.readings, stage_windows(run_dir))
    (round_1,) = summary["rounds"]
    metrics = {label: json.loads((run_dir / label / "manifest.json").read_text())["metrics"]
               for label in stage_peaks}
    params = parameter_count(shape_from_config_json(SHAPE, "gpu_smoke"))
    peak = peak_tflops(gpu, args.peak_tflops)
    train_tps = metrics["round_1/train"]["tokens_per_s"]
    report = {
        "gpu": gpu, "date": time.strftime("%Y-%m-%d"), "parameters": params, "model_build_seconds": build_seconds,
        "wall_seconds": time.perf_counter() - started, "peak_bf16_tflops": peak,
        "sampling_tokens_per_s": metrics["round_1/sample"]["tokens_per_s"],
        "sft_tokens_per_s": metrics["round_0/sft"]["tokens_per_s"], "train_tokens_per_s": train_tps,
        "train_mfu": 6 * params * train_tps / (peak * 1e12),
        "weight_refresh_seconds": round_1["weight_refresh_seconds"], "n_pairs": round_1["n_pairs"],
        "accuracy_before": round_1["accuracy_before"], "accuracy_after": round_1["accuracy_after"],
        "peak_mib": stage_peaks, "plan_mib": plan, "stage_seconds": round_1["stage_seconds"],
    }
    (args.out / "gpu_smoke.json").write_text(json.dumps(report, indent=2))
    planned = {"sample": "sample", "branch": "sample", "evaluate": "sample", "reference": "reference",
               "train": "train", "sft": "train"}
    print(f"\n{gpu}: {params:,} parameters, one Step-DPO round in {report['wall_seconds']:.0f} s")
    print(f"sampling {report['sampling_tokens_per_s']:,.0f} tokens/s; training {train_tps:,.0f} tokens/s "
          f"(SFT {report['sft_tokens_per_s']:,.0f}), MFU {report['train_mfu']:.1%} of {peak:g} TFLOP/s; "
          f"weight refresh {report['weight_refresh_seconds']:.1f} s; {report['n_pairs']} pairs")
    print(f"\n{'stage':<24}{'peak MiB':>10}{'plan MiB':>10}")
    for label, mib in stage_peaks.items():
        estimate = plan.get(planned.get(label.split("/")[1], ""))
        print(f"{label:<24}{mib or 0:>10,.0f}{'' if estimate is None else f'{estimate:>10,.0f}'}")
    print(f"\nwritten to {args.out / 'gpu_smoke.json'}")


if __name__ == "__main__":
    main()
