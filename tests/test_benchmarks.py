"""The benchmark harness and the DPO benchmark's pieces at tiny sizes (TRL only where benchmarks/.deps has it)."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import __main__ as harness
from benchmarks import dpo_vs_trl as bench
from benchmarks.dpo_inputs import step_pairs
from raypipe.config import TaskConfig
from raypipe.data.synthetic import load_splits
from raypipe.train.collate import pad_sequences
from tests.conftest import needs_trl

TINY = bench.Settings(batch_size=4, steps=12, warmup=2, threads=1, lr=3e-3)
"""One thread: on a busy machine two threads of small ops wait on each other far longer than they compute. Twelve
steps at lr 3e-3 are two passes over the 24 pairs, enough to lower the DPO loss (the last interval's, 8 pairs)
below log 2 - 0.02 whatever order the pairs come in (at lr 1e-3 one order left it at 0.675, just short, and 18
steps let it climb back): a contender that does not train is caught."""


@pytest.fixture(autouse=True)
def _restore_torch_threads() -> Iterator[None]:
    """The contenders set torch's thread count, which is process-wide: give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pairs(tiny_model_dir: Path, task_cfg: TaskConfig) -> list[bench.Pair]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return step_pairs(load_splits(task_cfg)["pool"], lambda s: tok(s, add_special_tokens=False)["input_ids"], 24)


def test_harness_rejects_unknown_names_and_arguments_to_all() -> None:
    with pytest.raises(SystemExit):
        harness.main(["no_such_benchmark"])
    with pytest.raises(SystemExit):
        harness.main(["all", "--steps", "3"])
    with pytest.raises(SystemExit, match="no module benchmarks/no_such_benchmark.py"):
        harness.load("no_such_benchmark")
    assert harness.load("dpo_vs_trl") is bench


def test_harness_passes_arguments_through(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):  # the benchmark's own parser: --steps must be a multiple of --warmup
        harness.main(["dpo_vs_trl", "--steps", "10", "--warmup", "4", "--contenders", "plain-live"])
    assert "--steps must be a multiple of --warmup" in capsys.readouterr().err


def test_run_teed_keeps_what_the_terminal_shows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stdout, stderr and a grandchild's output, in the order written, on the terminal and in the file alike."""
    script = ("import subprocess, sys; print('from python'); print('to stderr', file=sys.stderr); "
              "subprocess.run(['echo', 'from a child']); sys.exit(3)")
    assert harness.run_teed([sys.executable, "-c", script], tmp_path / "output.txt") == 3
    shown = "from python\nto stderr\nfrom a child\n"
    assert (tmp_path / "output.txt").read_text() == shown and capsys.readouterr().out == shown


def test_results_keeps_the_output_with_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []

    def teed(command: list[str], path: Path) -> int:
        ran.append(list(command))
        path.write_text("figures\n")
        return 0 if len(ran) == 1 else 4

    monkeypatch.setattr(harness, "run_teed", teed)
    dest = tmp_path / "dpo"
    harness.main(["--results", str(dest), "dpo_vs_trl", "--steps", "32"])
    assert ran == [[sys.executable, "-m", "benchmarks", "dpo_vs_trl", "--steps", "32"]]
    record = json.loads((dest / "record.json").read_text())
    assert record["command"] == f"python -m benchmarks --results {dest} dpo_vs_trl --steps 32"
    assert record["files"] == ["output.txt"] and (dest / "output.txt").read_text() == "figures\n"
    failed = tmp_path / "failed"
    with pytest.raises(SystemExit) as exit_:
        harness.main(["--results", str(failed), "all"])
    assert exit_.value.code == 4 and ran[-1] == [sys.executable, "-m", "benchmarks", "all"]
    assert (failed / "output.txt").is_file() and not (failed / "record.json").exists()
    with pytest.raises(SystemExit):
        harness.main(["--results", str(failed), "all", "--steps", "3"])
    assert len(ran) == 2, "`all` with arguments is refused before anything runs"


def test_step_pairs_differ_only_in_the_compared_step(pairs: list[bench.Pair], tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for pair in pairs:
        chosen, rejected = tok.decode(pair.chosen_ids), tok.decode(pair.rejected_ids)
        assert chosen != rejected and chosen.endswith("\n") and rejected.endswith("\n")
        assert chosen.split(" = ")[0] == rejected.split(" = ")[0]  # same step, wrong result
        assert tok.eos_token_id not in pair.chosen_ids + pair.rejected_ids
        row = pair.row()
        assert sum(row["chosen_mask"]) == len(pair.chosen_ids) and row["chosen_ids"][:len(pair.prompt_ids)] == \
            pair.prompt_ids


@pytest.mark.parametrize("live", [False, True])
def test_plain_loop_reports_consistent_figures(pairs: list[bench.Pair], tiny_model_dir: Path, live: bool) -> None:
    r = bench.plain_run(tiny_model_dir, pairs, TINY, live=live)
    per_pair = [len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert min(per_pair) <= r["tokens_per_s"] / r["pairs_per_s"] <= max(per_pair)
    assert r["padded_tokens_per_s"] >= r["tokens_per_s"]
    assert r["final_loss"] < math.log(2) - 0.02, "two passes over the pairs lower the DPO loss from log 2"
    assert r["peak_rss_mib"] > 100


def test_reference_logps_match_the_policy_before_training(pairs: list[bench.Pair], tiny_model_dir: Path) -> None:
    """The benchmark's live reference scores what raypipe's objective scores: the same model gives 0 log-ratio."""
    from transformers import AutoModelForCausalLM

    from raypipe.train.logprobs import TokenLogProbs
    from raypipe.train.objectives import PreferenceObjective

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    batch = pairs[:4]
    refs = bench._reference_logps(model, batch)
    rows = [PreferenceObjective().read({**p.row(), "ref_chosen_logps": c, "ref_rejected_logps": r}, 160)
            for p, (c, r) in zip(batch, refs)]
    with torch.no_grad():
        loss, stats = PreferenceObjective().step(TokenLogProbs(model, 4096), rows, pad_id=0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert stats["chosen"].abs().max().item() < 1e-5




@needs_trl
def test_trl_collates_the_tensors_raypipe_trains_on(pairs: list[bench.Pair]) -> None:
    bench.import_trl()
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=0)(
        [{"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids} for p in pairs])
    rows = [p.row() for p in pairs]
    ids, attn, mask = pad_sequences([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
                                    [r["chosen_mask"] for r in rows] + [r["rejected_mask"] for r in rows], 0)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], attn)
    assert torch.equal(batch["completion_mask"], mask)


@needs_trl
def test_trl_contender_runs(pairs: list[bench.Pair], tiny_model_dir: Path, tmp_path: Path) -> None:
    r = bench.trl_run(tiny_model_dir, pairs, TINY, precompute=True, out=str(tmp_path))
    per_pair = [len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert min(per_pair) <= r["tokens_per_s"] / r["pairs_per_s"] <= max(per_pair)
    assert r["final_loss"] < math.log(2) - 0.02


@pytest.mark.slow  # about 90 s: Ray, the reference stage and Ray Train's start-up dominate
def test_raypipe_contender_reports_from_the_ray_worker(pairs: list[bench.Pair], tiny_model_dir: Path,
                                                       tmp_path: Path) -> None:
    r = bench.run_contender("raypipe", tiny_model_dir, pairs, TINY, niceness=0, root=tmp_path)
    per_pair = [len(p.prompt_ids) * 2 + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    assert min(per_pair) <= r["tokens_per_s"] / r["pairs_per_s"] <= max(per_pair)
    assert r["padded_tokens_per_s"] >= r["tokens_per_s"] and r["tokens_per_cpu_s"] > 0
    assert r["final_loss"] < math.log(2) - 0.02
    assert r["peak_rss_mib"] > 100 and r["reference_s"] > 0 and r["setup_s"] > 0


def test_train_throughputs_plain_loop_trains(tiny_model_dir: Path, task_cfg: TaskConfig) -> None:
    """The SFT benchmark's baseline runs raypipe's loss as the trainer does and lowers it."""
    from transformers import AutoTokenizer

    from benchmarks.train_throughput import plain_loop
    from raypipe.config import OptimConfig

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for p in load_splits(task_cfg)["sft"][:16]:
        prompt, solution = (tok(t, add_special_tokens=False)["input_ids"] for t in (p.prompt, p.solution))
        rows.append((prompt + solution, [0] * len(prompt) + [1] * len(solution)))
    first = plain_loop(tiny_model_dir, rows, OptimConfig(lr=3e-3, warmup_steps=0, batch_size=8), 1, 0, 1)
    trained = plain_loop(tiny_model_dir, rows, OptimConfig(lr=3e-3, warmup_steps=0, batch_size=8), 12, 2, 1)
    assert trained["tokens_per_s"] > 0 and trained["final_loss"] < first["final_loss"] - 0.5


def test_gpu_smoke_model_decodes_every_id_of_its_padded_vocabulary(tmp_path: Path) -> None:
    """The smoke run's random model samples any of its vocabulary's ids: each must decode, while the task's text
    still encodes to the tokenizer's own (non-filler) ids. Checked here at a small shape."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.gpu_smoke import SHAPE, build_model

    corpus = [p.prompt + p.solution for p in load_splits(TaskConfig(sft_problems=50))["sft"]]
    shape = {**SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "vocab_size": 3000}
    folder = build_model(tmp_path / "model", corpus, shape)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    assert len(tokenizer) == model.config.vocab_size == 3000 and model.dtype == torch.bfloat16
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.decode([2999]) == "<|filler_2999|>"
    ids = tokenizer(corpus[0], add_special_tokens=False).input_ids
    assert max(ids) < 512 and tokenizer.decode(ids) == corpus[0]


def test_gpu_smoke_peaks_fall_in_each_stage_window() -> None:
    from benchmarks.gpu_smoke import peaks

    readings = [(10.0, 500.0), (11.0, 9000.0), (12.0, 700.0), (20.0, 4000.0)]
    assert peaks(readings, {"a": (9.5, 12.5), "b": (19.0, 21.0), "c": (30.0, 31.0)}) == {
        "a": 9000.0, "b": 4000.0, "c": None}


def test_end_to_end_policy_run_stands_in_for_round_0_only(tmp_path: Path) -> None:
    """`--policy-run` must reuse the starting policy and nothing after it: a folder offering the whole finished
    run would let its round 1 stand in too, and the benchmark would time nothing."""
    from benchmarks.end_to_end import round0_only

    run = tmp_path / "quickstart"
    for label in ("round_0/sft", "round_0/evaluate", "round_1/train"):
        (run / label).mkdir(parents=True)
        (run / label / "manifest.json").write_text("{}")
    folder = round0_only(run, tmp_path / "bench" / "x-policy")
    assert sorted(p.name for p in folder.iterdir()) == ["round_0"]
    assert (folder / "round_0").resolve() == (run / "round_0").resolve()
    assert (folder / "round_0" / "sft" / "manifest.json").is_file()
    with pytest.raises(SystemExit, match="no finished round_0/sft"):
        round0_only(tmp_path / "missing", tmp_path / "bench" / "y-policy")
