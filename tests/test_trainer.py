"""The Ray Train + DeepSpeed loop: SFT, Step-DPO with precomputed reference log-probs, AFT, ZeRO-3 on 2 CPU
workers, the dev-accuracy stop, and a run killed after a checkpoint then resumed. Six TorchTrainer fits in all
(10-20 s each here, one in a driver of its own); the rest are pure-function tests."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.config import OptimConfig, TaskConfig, TrainConfig
from raypipe.data.synthetic import load_splits
from raypipe.ray_env import init_ray
from raypipe.train.collate import pad_sequences, truncate_left
from raypipe.train.checkpoint import LATEST
from raypipe.train.loop import lr_factor
from raypipe.train.objectives import AFTObjective, PreferenceObjective, SFTObjective
from raypipe.train.reference import add_reference_logps, write_reference_logps
from raypipe.train.trainer import DevEval, TrainJob, run_training
from raypipe.train.worker_group import worker_group
from tests.test_resume import ROOT, _kill_session


@pytest.fixture(scope="module")
def ray_cluster():
    """The session's local cluster (the e2e run may have started it already), started as the pipeline does."""
    init_ray(8)
    yield


@pytest.fixture(scope="module")
def splits(task_cfg: TaskConfig):
    return load_splits(task_cfg)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _sft_parquet(model_dir: Path, problems, path: Path) -> Path:
    """Prompt + worked solution + EOS, learning the solution and EOS only."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for p in problems:
        prompt, solution = _ids(tok, p.prompt), _ids(tok, p.solution) + [tok.eos_token_id]
        rows.append({"input_ids": prompt + solution, "loss_mask": [0] * len(prompt) + [1] * len(solution)})
    pd.DataFrame(rows).to_parquet(path)
    return path


def _weights(model_dir: Path | str) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(model_dir).state_dict()


def _changed(start: Path, trained: str) -> bool:
    a, b = _weights(start), _weights(trained)
    assert a.keys() == b.keys()
    assert all(torch.isfinite(v).all() for v in b.values())
    return any(not torch.equal(a[k], b[k]) for k in a)


def _sft_loss(model_dir: Path | str, data: Path) -> float:
    """Mean SFT loss of a model on a Parquet file of SFT rows (to check an export holds the trained weights)."""
    from raypipe.train.losses import sft_loss, token_logps

    df = pd.read_parquet(data)
    ids, attn, mask = pad_sequences([list(r) for r in df["input_ids"]], [list(r) for r in df["loss_mask"]], 0)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(model_dir)(input_ids=ids, attention_mask=attn).logits
    return float(sft_loss(token_logps(logits, ids), mask))


def _log_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_truncate_left_keeps_the_end_and_pad_sequences_pads_right() -> None:
    assert truncate_left([1, 2, 3, 4], [0, 0, 1, 1], 3) == ([2, 3, 4], [0, 1, 1])
    assert truncate_left([1, 2], [0, 1], 5) == ([1, 2], [0, 1])
    ids, attn, mask = pad_sequences([[5, 6, 7], [8]], [[0, 1, 1], [1]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and ids.dtype == torch.long
    assert attn.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert mask.tolist() == [[0, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError):
        pad_sequences([[1, 2]], [[1]], pad_id=0)


def test_lr_schedule_warms_up_then_decays_to_min_ratio() -> None:
    lrs = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1
    assert math.isclose(lr_factor(20, 4, 20, 0.1), 0.1)
    assert lr_factor(0, 0, 10, 0.0) == 1.0, "no warmup starts at the peak"


def test_dev_stop_rule_needs_target_or_a_plateau_above_min_accuracy() -> None:
    dev = DevEval(prompts=["q"], answers=["1"], kind="synthetic", target_accuracy=0.6, plateau_evals=3,
                  min_improvement=0.01, min_accuracy=0.2)
    assert dev.should_stop([0.1, 0.3, 0.61]) == "target"
    assert dev.should_stop([0.0, 0.0, 0.0, 0.0, 0.0]) is None, "a flat 0% is the pre-transition phase"
    assert dev.should_stop([0.3, 0.305, 0.3, 0.308]) == "plateau"
    assert dev.should_stop([0.3, 0.305, 0.3]) is None, "only two evaluations without improvement"
    assert dev.should_stop([0.3, 0.35, 0.34, 0.37]) is None


@pytest.fixture(scope="module")
def sft_zero2(ray_cluster, tiny_model_dir: Path, splits, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """8 uninterrupted SFT steps (2 epochs of 64 rows), no checkpoints: the run a resumed one must match."""
    tmp_path = tmp_path_factory.mktemp("sft_zero2")
    data = _sft_parquet(tiny_model_dir, splits["sft"][:64], tmp_path / "sft.parquet")
    job = TrainJob(objective=SFTObjective(), model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                   data_path=str(data), optim=OptimConfig(lr=3e-3, warmup_steps=2, batch_size=16), epochs=2,
                   log_path=str(tmp_path / "log.jsonl"))
    return {"job": job, "result": run_training(job, TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1))}


def test_sft_zero2_learns_logs_and_exports(sft_zero2: dict, tiny_model_dir: Path) -> None:
    result, data = sft_zero2["result"], Path(sft_zero2["job"].data_path)
    lines = _log_lines(Path(sft_zero2["job"].log_path))
    assert result.steps == 8 and result.stop_reason == "epochs"
    assert result.resumed_from_step == 0 and result.dropped == {"shard_equalise": 0}
    assert [line["step"] for line in lines] == list(range(1, 9))
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5, [line["loss"] for line in lines]
    assert {"loss", "lr", "tokens_per_s"} <= lines[0].keys()
    assert result.tokens == lines[-1]["tokens"] > 0 and result.tokens_per_s > 0
    assert (Path(result.output_dir) / "tokenizer.json").is_file()
    assert _changed(tiny_model_dir, result.output_dir)
    assert _sft_loss(result.output_dir, data) < _sft_loss(tiny_model_dir, data) - 0.5


def test_killed_training_resumes_from_its_last_checkpoint(sft_zero2: dict, tmp_path: Path) -> None:
    """SIGKILL a driver training `sft_zero2`'s job with a checkpoint every 2 steps once one is registered, rerun
    the job: it starts at the checkpoint's step, trains the remaining batches in the same order, logs each step
    once and ends with the uninterrupted run's weights."""
    checkpoints = tmp_path / "checkpoints"
    job = replace(sft_zero2["job"], output_dir=str(tmp_path / "out"), log_path=str(tmp_path / "log.jsonl"),
                  checkpoint_dir=str(checkpoints))
    cfg = TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1, checkpoint_every_steps=2)
    (tmp_path / "job.pkl").write_bytes(pickle.dumps((job, cfg)))
    code = ("import pickle, sys; from raypipe.ray_env import init_ray; from raypipe.train.trainer import run_training; "
            "job, cfg = pickle.loads(open(sys.argv[1], 'rb').read()); init_ray(8); run_training(job, cfg)")
    with (tmp_path / "driver.log").open("w") as out:
        driver = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "job.pkl")], stdout=out,
                                  stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    try:
        while not (checkpoints / LATEST).is_file():
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.01)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        _kill_session(driver.pid)
    assert not Path(job.output_dir).exists(), "killed before the export"
    step = json.loads((checkpoints / LATEST).read_text())["step"]

    result = run_training(job, cfg)
    assert result.resumed_from_step == step and step in (2, 4, 6)
    assert result.steps == sft_zero2["result"].steps == 8 and result.stop_reason == "epochs"
    assert [line["step"] for line in _log_lines(tmp_path / "log.jsonl")] == list(range(1, 9))
    assert result.tokens == sft_zero2["result"].tokens, "the same batches, each trained once"
    mine, theirs = _weights(result.output_dir), _weights(sft_zero2["result"].output_dir)
    assert all(torch.allclose(mine[k], theirs[k], atol=1e-5) for k in theirs), "the uninterrupted run's weights"


def _training_workers() -> int:
    """Ray Train worker actors alive in the cluster."""
    from ray.util.state import list_actors

    return len(list_actors(address=ray.get_runtime_context().gcs_address,
                           filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]))


def test_worker_group_serves_jobs_in_turn_and_is_replaced_after_a_failure(sft_zero2: dict, tmp_path: Path) -> None:
    """Jobs in a row run on the one kept worker group (one fit: its start-up is paid once) and each starts clean:
    the same job twice gives the same weights. A job whose data is missing raises the worker's error on the
    driver and ends the group; the next job gets a new one. With keep_workers off a job's group ends with it."""
    cfg = TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1)
    short = replace(sft_zero2["job"], max_steps=2, log_path=None)
    first = run_training(replace(short, output_dir=str(tmp_path / "first")), cfg)
    group = worker_group(cfg)
    second = run_training(replace(short, output_dir=str(tmp_path / "second")), cfg)
    assert worker_group(cfg) is group and group.alive, "the same group served both jobs"
    assert first.steps == second.steps == 2
    a, b = _weights(first.output_dir), _weights(second.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "no optimiser or schedule state carried from the first job"

    with pytest.raises(Exception, match="nope.parquet"):
        run_training(replace(short, data_path=str(tmp_path / "nope.parquet"), output_dir=str(tmp_path / "x")), cfg)
    assert not group.alive
    third = run_training(replace(short, output_dir=str(tmp_path / "third")), cfg)
    assert third.steps == 2 and worker_group(cfg) is not group and worker_group(cfg).alive

    before = _training_workers()
    own = run_training(replace(short, output_dir=str(tmp_path / "own")), replace(cfg, keep_workers=False))
    assert own.steps == 2
    deadline = time.time() + 30
    while _training_workers() != before and time.time() < deadline:
        time.sleep(0.5)
    assert _training_workers() == before == 1, "only the kept group's worker is left"


def test_micro_batches_checkpointing_chunks_packing_and_offload_train_like_one_batch(sft_zero2: dict,
                                                                           tmp_path: Path) -> None:
    """`sft_zero2`'s job in micro-batches of 4 (4 forward/backwards per step), with gradient checkpointing,
    16-token log-prob chunks, packed rows and the Adam states offloaded: the same steps, tokens and per-step
    log, the same first loss, and losses that stay within rounding of the one-batch run's."""
    job = replace(sft_zero2["job"], output_dir=str(tmp_path / "out"), log_path=str(tmp_path / "log.jsonl"))
    result = run_training(job, TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1, micro_batch_size=4,
                                           gradient_checkpointing=True, logits_chunk_tokens=16,
                                           offload_optimizer=True, packing=True))
    mine, theirs = _log_lines(tmp_path / "log.jsonl"), _log_lines(Path(sft_zero2["job"].log_path))
    assert result.steps == 8 and [line["step"] for line in mine] == list(range(1, 9))
    assert result.tokens == sft_zero2["result"].tokens
    assert mine[0]["loss"] == pytest.approx(theirs[0]["loss"], rel=1e-5), "step 1: same weights, same loss"
    assert [line["loss"] for line in mine] == pytest.approx([line["loss"] for line in theirs], rel=2e-3)


def test_dpo_starts_at_log2_with_precomputed_reference(ray_cluster, tiny_model_dir: Path, splits,
                                                       tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for p in splits["sft"][:16]:
        prompt = _ids(tok, p.prompt + p.steps[0] + "\n")
        good = _ids(tok, p.steps[1] + "\n")
        bad = _ids(tok, p.steps[1].rsplit("= ", 1)[0] + f"= {int(p.steps[1].rsplit('= ', 1)[1]) + 1}\n")
        rows.append({"chosen_ids": prompt + good, "chosen_mask": [0] * len(prompt) + [1] * len(good),
                     "rejected_ids": prompt + bad, "rejected_mask": [0] * len(prompt) + [1] * len(bad)})
    pairs = add_reference_logps(ray.data.from_pandas(pd.DataFrame(rows)), str(tiny_model_dir), batch_size=8,
                                max_length=64)
    pairs.write_parquet(str(tmp_path / "pairs"))
    job = TrainJob(objective=PreferenceObjective("sigmoid", beta=0.1), model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                   data_path=str(tmp_path / "pairs"), optim=OptimConfig(lr=1e-3, warmup_steps=0, batch_size=16),
                   max_steps=4, epochs=5, max_length=64,
                   log_path=str(tmp_path / "log.jsonl"))
    result = run_training(job, TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1))
    lines = _log_lines(tmp_path / "log.jsonl")
    assert result.steps == 4 and result.stop_reason == "max_steps"
    assert abs(lines[0]["loss"] - math.log(2)) < 1e-4, lines[0]
    assert any("accuracy" in k for k in lines[0]) and any("reward" in k for k in lines[0]), lines[0].keys()
    assert lines[-1]["loss"] < lines[0]["loss"], "every step sees all 16 pairs: the loss must fall"


@pytest.mark.xfail(strict=False, reason="known bug: preserve_order kept the order in 2 runs of 3 (one full run "
                   "wrote rows 32.. before 28); the stage needs a row index the output is sorted by")
def test_reference_stage_writes_the_pairs_in_the_order_it_read_them(ray_cluster, tiny_model_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The written file is the training set and its row order the batch order: out of order, a rerun of the stage
    trains on other batches (it did, before the order was kept: same pairs, another model)."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = _ids(tok, "12 + 7 = 19, 19 * 2 = 38\n")
    assert len(ids) >= 10
    rows = pd.DataFrame([{"row": i, "chosen_ids": ids[: 4 + i % 5], "chosen_mask": [1] * (4 + i % 5),
                          "rejected_ids": ids[: 3 + i % 7], "rejected_mask": [1] * (3 + i % 7)} for i in range(48)])
    source = tmp_path / "pairs"
    source.mkdir()
    for k, part in enumerate(range(0, 48, 6)):  # several files: several read tasks, blocks that can overtake
        rows.iloc[part:part + 6].to_parquet(source / f"part-{k:02d}.parquet")
    write_reference_logps(str(source), tmp_path / "out", str(tiny_model_dir), batch_size=2, num_actors=2,
                          max_length=64)
    written = pd.read_parquet(tmp_path / "out")
    assert written["row"].tolist() == list(range(48))
    assert written["ref_chosen_logps"].notna().all() and (written["ref_chosen_logps"] < 0).all()


def test_zero3_two_workers_stops_at_first_dev_eval(ray_cluster, tiny_model_dir: Path, splits,
                                                    tmp_path: Path) -> None:
    data = _sft_parquet(tiny_model_dir, splits["sft"][:63], tmp_path / "sft.parquet")  # odd: one row left out
    dev = DevEval(prompts=[p.prompt for p in splits["dev"][:9]], answers=[str(p.answer) for p in splits["dev"][:9]],
                  kind="synthetic", every_steps=2, target_accuracy=0.0, max_new_tokens=8)
    job = TrainJob(objective=SFTObjective(), model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                   data_path=str(data), optim=OptimConfig(lr=3e-3, warmup_steps=0, batch_size=16), epochs=10,
                   max_steps=6, dev_eval=dev, log_path=str(tmp_path / "log.jsonl"))
    # micro-batches and log-prob chunks small enough that the ranks call the output layer unequally often
    result = run_training(job, TrainConfig(num_workers=2, cpus_per_worker=1, zero_stage=3, log_every_steps=1,
                                           micro_batch_size=4, logits_chunk_tokens=16))
    assert result.stop_reason == "target" and result.steps == 2
    assert result.dropped == {"shard_equalise": 1}, "31 rows on each of the 2 ranks"
    assert [r["step"] for r in result.dev_history] == [2] and result.dev_history[0]["accuracy"] >= 0.0
    assert [line["step"] for line in _log_lines(tmp_path / "log.jsonl")] == [1, 2]
    assert _changed(tiny_model_dir, result.output_dir)
    assert _sft_loss(result.output_dir, data) < _sft_loss(tiny_model_dir, data) - 0.2, "gathered, not stale, weights"


def _aft_rows(tok, problems) -> list[dict]:
    """Each row: one worked solution for L_VFT, and the question's right chain against a chain whose last step is
    off by one (ranked by how far it got, as the synthetic task does)."""
    rows = []
    for k, p in enumerate(problems):
        prompt = _ids(tok, p.prompt)
        right = _ids(tok, p.solution) + [tok.eos_token_id]
        wrong = _ids(tok, p.solution.replace(f"is {p.answer}.", f"is {p.answer + 1}.")) + [tok.eos_token_id]
        other = problems[(k + 1) % len(problems)]  # L_VFT on another problem: it cannot rank this one's chains
        worked = _ids(tok, other.prompt), _ids(tok, other.solution) + [tok.eos_token_id]
        rows.append({"sft_ids": worked[0] + worked[1], "sft_mask": [0] * len(worked[0]) + [1] * len(worked[1]),
                     "cand_ids": [prompt + right, prompt + wrong],
                     "cand_mask": [[0] * len(prompt) + [1] * len(right), [0] * len(prompt) + [1] * len(wrong)],
                     "cand_positive": [True, False], "cand_rank": [1000, len(p.steps) + 1]})
    return rows


def test_aft_trains_and_logs_alignment_and_constraint_terms(ray_cluster, tiny_model_dir: Path, splits,
                                                            tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    pd.DataFrame(_aft_rows(tok, splits["sft"][:16])).to_parquet(tmp_path / "aft.parquet")
    job = TrainJob(objective=AFTObjective("bc", beta=0.5), model_dir=str(tiny_model_dir),
                   output_dir=str(tmp_path / "out"), data_path=str(tmp_path / "aft.parquet"),
                   optim=OptimConfig(lr=3e-3, warmup_steps=0, batch_size=16), epochs=6, max_length=96,
                   log_path=str(tmp_path / "log.jsonl"))
    result = run_training(job, TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1))
    lines = _log_lines(tmp_path / "log.jsonl")
    assert result.steps == 6
    assert {"aft/vft", "aft/alignment", "aft/constrained", "aft/pair_accuracy", "aft/pair_margin"} <= lines[0].keys()
    assert lines[-1]["aft/vft"] < lines[0]["aft/vft"], "the L_VFT term is trained"
    assert lines[-1]["aft/pair_margin"] > lines[0]["aft/pair_margin"], "right chains pull ahead of wrong ones"
