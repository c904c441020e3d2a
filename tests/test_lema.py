"""LEMA: the worked demonstrations, the corrector prompt, parsing (malformed outputs included), the exact
corrector, the final-answer filter, the training rows, LoRA through Ray Train, and a round end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from raypipe.config import ConfigError, OptimConfig, RunConfig, TaskConfig, TrainConfig, load_config
from raypipe.data.synthetic import ArithmeticProblem, load_splits, make_problem
from raypipe.engines import SamplingSpec
from raypipe.grading import extract_answer, is_equivalent
from raypipe.lema.correct import correct_mistakes, correction_metrics, policy_mistakes
from raypipe.lema.exact import exact_correction, format_corpus
from raypipe.lema.format import (Correction, correction_input, corrector_prompt, demonstrations, final_answer,
                                 numbered_steps, parse_correction)
from raypipe.methods import lema
from raypipe.methods.base import BuildInputs
from raypipe.ray_env import init_ray
from raypipe.tasks import Problem, make_task
from raypipe.train.objectives import SFTObjective
from raypipe.train.trainer import TrainJob, run_training
from raypipe.update_config import LoRAConfig

PROBLEM = ArithmeticProblem("Start with 23. Add 45. Subtract 17. What is the result?",
                            ("Step 1: 23 + 45 = 68", "Step 2: 68 - 17 = 51"), 51)
SYNTHETIC = make_task(TaskConfig())


@pytest.mark.parametrize("kind", ["synthetic", "gsm8k", "math"])
def test_demonstrations_are_wrong_solutions_with_right_corrections(kind: str) -> None:
    shots = demonstrations(kind)
    assert len(shots) == 4
    for ex in shots:
        assert 1 <= ex["incorrect_step"] <= len(ex["solution"])
        assert not is_equivalent(extract_answer(ex["solution"][-1], kind), ex["answer"], kind), ex["question"]
        correction = Correction(ex["incorrect_step"], ex["explanation"], tuple(ex["corrected"]))
        assert is_equivalent(final_answer(correction, kind), ex["answer"], kind), ex["question"]
        assert parse_correction(correction.text(), len(ex["solution"])) == correction  # LaTeX braces included
        assert ex["corrected"][0].startswith(f"Step {ex['incorrect_step']}:")


def test_corrector_prompt_has_four_shots_and_ends_at_the_fields() -> None:
    steps = numbered_steps("Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 41\nThe answer is 41.")
    assert steps == ["Step 1: 23 + 45 = 68", "Step 2: 68 - 17 = 41", "Step 3: The answer is 41."]
    prompt = corrector_prompt("synthetic", PROBLEM.question, steps)
    assert prompt.count("Incorrect Step:") == 5 and prompt.count("Correct Solution: {") == 4
    assert prompt.endswith(f"Question: {PROBLEM.question}\nOriginal Solution: {{\n" + "\n".join(steps)
                           + "\n}\nIncorrect Step:")
    with pytest.raises(ValueError, match="no corrector demonstrations"):
        corrector_prompt("chess", "q", steps)


def test_a_correction_round_trips_through_its_text() -> None:
    correction = Correction(2, "68 - 17 is 51, not 41.", ("Step 2: 68 - 17 = 51", "Step 3: The answer is 51."))
    text = correction.text()
    assert text.startswith(" Step 2.\nExplanation: 68 - 17 is 51, not 41.\nCorrect Solution: {\n...\n")
    assert parse_correction(text, 3) == correction
    assert parse_correction("Incorrect Step:" + text + "\n\nQuestion: next one...", 3) == correction  # echo, run-on
    first = Correction(1, "Wrong start.", ("Step 1: 23 + 45 = 68",))
    assert "..." not in first.text() and parse_correction(first.text(), 3) == first


@pytest.mark.parametrize("output, reason", [
    ("I think the solution is fine.", "no_incorrect_step"),
    (" Step 2.\nCorrect Solution: {\nStep 2: 1 + 1 = 2\n}", "no_explanation"),
    (" Step 2.\nExplanation:   \nCorrect Solution: {\nStep 2: 1 + 1 = 2\n}", "no_explanation"),
    (" Step 2.\nExplanation: bad sum.", "no_correct_solution"),
    (" Step 2.\nExplanation: bad sum.\nCorrect Solution: Step 2: 1 + 1 = 2", "no_correct_solution"),
    (" Step 2.\nExplanation: bad sum.\nCorrect Solution: {\n...\n}", "no_correct_solution"),
    (" Step 2.\nExplanation: bad sum.\nCorrect Solution: {\nStep 2: 1 + 1 = 2\nStep 3: The answer", "unclosed_solution"),
    (" Step 9.\nExplanation: bad sum.\nCorrect Solution: {\nStep 9: 1 + 1 = 2\n}", "step_out_of_range"),
    (" Step 0.\nExplanation: bad sum.\nCorrect Solution: {\nStep 0: 1 + 1 = 2\n}", "step_out_of_range"),
    ("", "no_incorrect_step"),
    ("Step 2. Explanation: bad sum. Correct Solution: { Step 2: 1 + 1 = 2 }", "unclosed_solution"),
])
def test_malformed_corrector_outputs_are_counted_by_reason(output: str, reason: str) -> None:
    assert parse_correction(output, 3) == reason


@pytest.mark.parametrize("completion, step, explanation", [
    ("Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 41\nThe answer is 41.", 2, "68 - 17 is 51, not 41."),
    ("Step 1: 23 + 45 = 68\nStep 2: 66 - 17 = 49\nThe answer is 49.", 2, "Step 2 starts from 66, but step 1 gave 68."),
    ("Step 1: 23 + 54 = 77\nStep 2: 77 - 17 = 60\nThe answer is 60.", 1,
     "The question says to add 45 here, but step 1 computes 23 + 54."),
    ("Step 1: 32 + 45 = 77\n", 1, "Step 1 starts from 32, but the start value is 23."),
    ("Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 51\nThe answer is 15.", 3, "The answer must repeat the last result, 51."),
    ("Step 1: 23 + 45 = 68\n", 2, "The solution stops after step 1 without reaching the answer."),
    ("Step 1: twenty\n", 1, "Step 1 should be the calculation 23 + 45 = 68."),
])
def test_exact_corrector_names_the_first_wrong_step_and_why(completion: str, step: int, explanation: str) -> None:
    correction = exact_correction(PROBLEM, completion)
    assert (correction.incorrect_step, correction.explanation) == (step, explanation)
    assert correction.corrected[-1] == "Step 3: The answer is 51."
    assert correction.corrected[0].startswith(f"Step {step}:")


def test_exact_corrections_always_reach_the_gold_answer() -> None:
    rng, cfg = random.Random(0), TaskConfig(num_steps_min=2, num_steps_max=5, operations=["+", "-", "*"])
    for _ in range(300):
        problem = make_problem(rng, cfg)
        lines = [*problem.steps, f"The answer is {problem.answer}."]
        k = rng.randrange(len(lines))
        lines[k] = lines[k][:-1] + str(rng.randint(0, 9))  # garble the last digit (or the period)
        completion = "\n".join(lines[: rng.randint(k + 1, len(lines))])
        correction = exact_correction(problem, completion)
        if correction is None:  # the garbled digit happened to be the right one, and nothing was cut
            assert completion == problem.solution
            continue
        assert final_answer(correction, "synthetic") == str(problem.answer)
    assert exact_correction(PROBLEM, PROBLEM.solution) is None


def test_a_one_line_answer_and_latex_braces_parse() -> None:
    one_line = "Step 1. Explanation: wrong sign. Correct Solution: {\nStep 1: $\\frac{1}{2} + \\frac{1}{2} = 1$\n}"
    assert parse_correction(one_line, 2) == Correction(1, "wrong sign.", ("Step 1: $\\frac{1}{2} + \\frac{1}{2} = 1$",))


def test_blank_lines_do_not_shift_the_exact_correction() -> None:
    spaced = "Step 1: 23 + 45 = 68\n\nStep 2: 68 - 17 = 41\nThe answer is 41."
    correction = exact_correction(PROBLEM, spaced)
    assert (correction.incorrect_step, correction.explanation) == (2, "68 - 17 is 51, not 41.")


def test_a_model_corrector_is_parsed_filtered_and_accounted_for(tmp_path: Path) -> None:
    """The model path with a real (random, untrained) local model: whatever it writes, every mistake leaves with
    a status, a malformed output counted by its reason."""
    from raypipe.config import EngineConfig, ModelConfig
    from raypipe.data.tiny_model import save_tiny_model
    from raypipe.data_config import ModelCallConfig
    from raypipe.engines import make_text_generator

    model = save_tiny_model(ModelConfig(max_position_embeddings=4096), [PROBLEM.prompt + PROBLEM.solution],
                            tmp_path / "model")
    corrector = make_text_generator(ModelCallConfig(backend="local", model=str(model)),
                                    EngineConfig(backend="hf", max_model_len=1024), tmp_path)
    mistakes = [{"qid": 0, "question": PROBLEM.question, "gold": "51", "source": "policy",
                 "completion": "Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 41\nThe answer is 41."}] * 2
    for chat in (False, True):
        rows = correct_mistakes(mistakes, SYNTHETIC, {}, corrector, SamplingSpec(max_tokens=24), chat)
        assert len(rows) == 2 and all(r["status"] in {"kept", "wrong_final_answer", "no_final_answer",
                                                       "no_incorrect_step", "no_explanation", "no_correct_solution",
                                                       "unclosed_solution", "step_out_of_range"} for r in rows)
    assert corrector.usage.requests == 4


def test_mistakes_are_distinct_and_capped_per_question() -> None:
    graded = [{"qid": 0, "question": "q", "gold": "1", "completion": c, "correct": ok}
              for c, ok in [("a", False), ("a", False), ("b", True), ("c", False), ("d", False), ("e", False)]]
    assert [m["completion"] for m in policy_mistakes(graded, 2)] == ["a", "c"]


def test_correct_mistakes_filters_on_the_final_answer() -> None:
    mistakes = [{"qid": 0, "question": PROBLEM.question, "gold": "51", "source": "policy",
                 "completion": "Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 41\nThe answer is 41."},
                {"qid": 0, "question": PROBLEM.question, "gold": "51", "source": "policy",
                 "completion": PROBLEM.solution}]
    record = Problem(id=0, question=PROBLEM.question, gold=str(PROBLEM.answer))
    rows = correct_mistakes(mistakes, SYNTHETIC, {0: record}, None, SamplingSpec())
    assert [r["status"] for r in rows] == ["kept", "nothing_to_correct"]
    assert rows[0]["predicted"] == "51" and rows[0]["incorrect_step"] == 2
    metrics = correction_metrics(rows)
    assert (metrics["kept"], metrics["corrections_parsed"], metrics["filter_pass_rate"]) == (1, 1, 1.0)
    assert metrics["not_kept_by_reason"] == {"nothing_to_correct": 1}
    dataset = make_task(TaskConfig(source="dataset", answer_kind="gsm8k"))
    with pytest.raises(ConfigError, match="lema.corrector=exact needs an exact corrector, which the dataset task"):
        correct_mistakes(mistakes, dataset, {0: record}, None, SamplingSpec())


def test_training_rows_mix_cot_and_corrections_with_loss_on_outputs(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    encode = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    correction = exact_correction(PROBLEM, "Step 1: 23 + 45 = 68\nStep 2: 68 - 17 = 41\nThe answer is 41.")
    kept = {"qid": 7, "question": PROBLEM.question, "source": "policy", "status": "kept",
            "steps": ["Step 1: 23 + 45 = 68", "Step 2: 68 - 17 = 41", "Step 3: The answer is 41."],
            "incorrect_step": 2, "explanation": correction.explanation, "corrected": list(correction.corrected)}
    worked = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}]
    cfg = RunConfig()
    cfg.lema.max_length = 1024
    rows = lema.build(BuildInputs(cfg=cfg, round=1, worked=worked, corrections=[kept, {**kept, "status": "x"}],
                                  eos_id=tok.eos_token_id, encode=encode, provenance={"round": 1}))
    assert [r["source"] for r in rows] == ["cot", "correction:policy"]
    row = rows[1]
    prompt = encode(correction_input(PROBLEM.question, kept["steps"]))
    assert row["input_ids"][: len(prompt)] == prompt and not any(row["loss_mask"][: len(prompt)])
    assert all(row["loss_mask"][len(prompt):]) and row["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(row["input_ids"][len(prompt):-1]) == correction.text()
    cfg.lema.explanations = False  # the explanation-free ablation: same example, the Explanation line gone
    ablated = lema.build(BuildInputs(cfg=cfg, round=1, worked=worked, corrections=[kept], eos_id=tok.eos_token_id,
                                     encode=encode))[1]
    assert ablated["input_ids"][: len(prompt)] == prompt
    target = " Step 2.\nCorrect Solution: {\n...\nStep 2: 68 - 17 = 51\nStep 3: The answer is 51.\n}"
    assert tok.decode(ablated["input_ids"][len(prompt):-1]) == target
    assert correction.text() == target.replace("\nCorrect", f"\nExplanation: {correction.explanation}\nCorrect")
    cfg.lema.explanations = True
    cfg.lema.max_length = len(row["input_ids"]) - 1
    assert [r["source"] for r in lema.build(BuildInputs(cfg=cfg, round=1, worked=worked, corrections=[kept],
                                                        eos_id=0, encode=encode))] == ["cot"]


def test_format_corpus_teaches_the_tokenizer_the_correction_words() -> None:
    from raypipe.data.tiny_model import build_tokenizer

    splits = load_splits(TaskConfig(sft_problems=300, pool_questions=10, dev_problems=10, test_problems=10))
    task_only = [p.prompt + p.solution for p in splits["sft"]]
    extra = format_corpus(splits["sft"])
    assert len(extra) == len(splits["sft"]) and all("Correct Solution: {" in t for t in extra)
    plain, taught = build_tokenizer(task_only), build_tokenizer(task_only + extra)
    sample = extra[0]
    assert len(taught(sample).input_ids) < 0.6 * len(plain(sample).input_ids)


def test_lora_trains_adapters_and_exports_a_merged_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    init_ray(8)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    problems = load_splits(TaskConfig(sft_problems=64, pool_questions=10, dev_problems=10, test_problems=10))["sft"]
    rows = []
    for p in problems:
        prompt = tok(p.prompt, add_special_tokens=False).input_ids
        answer = tok(p.solution, add_special_tokens=False).input_ids + [tok.eos_token_id]
        rows.append({"input_ids": prompt + answer, "loss_mask": [0] * len(prompt) + [1] * len(answer)})
    pd.DataFrame(rows).to_parquet(tmp_path / "sft.parquet")
    job = TrainJob(objective=SFTObjective(), model_dir=str(tiny_model_dir), output_dir=str(tmp_path / "out"),
                   data_path=str(tmp_path / "sft.parquet"), optim=OptimConfig(lr=1e-2, warmup_steps=0, batch_size=16),
                   epochs=2, lora=LoRAConfig(rank=8, alpha=16))
    result = run_training(job, TrainConfig(num_workers=1, zero_stage=2, log_every_steps=1))
    assert result.steps == 8
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(result.output_dir).state_dict()
    assert after.keys() == before.keys(), "merged: a plain checkpoint without adapter weights"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith(".weight") and ("proj" in k) for k in changed), changed
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"]), "base frozen"


def test_template_evolution_keeps_the_operations_and_changes_the_question() -> None:
    from raypipe.lema.evolve import majority, seed_questions, template_evolve

    rng = random.Random(0)
    for _ in range(20):
        evolved = template_evolve(PROBLEM, rng, TaskConfig())
        assert evolved.question != PROBLEM.question
        assert [s.split()[3] for s in evolved.steps] == ["+", "-"]
        assert exact_correction(evolved, evolved.solution) is None  # its own steps are right
    kept = [{"qid": 1}, {"qid": 1}, {"qid": 2}]
    seeds = seed_questions(kept, 300, random.Random(0))
    assert 150 < sum(s["qid"] == 1 for s in seeds) < 250, "a question corrected twice is drawn twice as often"
    assert seed_questions([], 5, rng) == []
    assert (majority(["7", "7", None]), majority(["7", "8", "9"]), majority([None] * 3)) == ("7", None, None)


def test_lora_under_zero3_is_a_config_error() -> None:
    from raypipe.config import ConfigError

    with pytest.raises(ConfigError, match="zero_stage <= 2"):
        load_config(None, ["method=lema", "lema.lora.rank=8", "train.zero_stage=3"])


def test_a_lema_round_end_to_end(e2e_run: dict, served: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """From the e2e run's SFT checkpoint (reused, same fingerprint): sample, correct (the exact corrector, plus the
    mistakes of a second generator model behind the OpenAI-compatible API, plus evolved questions), build, train,
    evaluate."""
    from raypipe.data_config import ModelCallConfig
    from raypipe.pipeline import Pipeline
    from tests.conftest import E2E_OVERRIDES

    monkeypatch.setenv("RAYPIPE_TEST_API_KEY", served["token"])
    overrides = ["name=e2e_lema", "method=lema", f"output_dir={e2e_run['cfg'].output_dir}", "round_steps=10",
                 "control.enabled=false", "eval.assessment_questions=0", "sampling.questions_per_round=24",
                 "engine.num_cpus=1"]  # the Serve app holds some of the session cluster's CPUs
    cfg = load_config(Path(__file__).resolve().parents[1] / "conf" / "quickstart.yaml", [*E2E_OVERRIDES, *overrides])
    cfg.lema.evolve_questions = 8
    # within the served app's 2 running + 2 queued, so overload's 503s (tested in test_serving) never reach here
    cfg.lema.mistake_models = [ModelCallConfig(base_url=f"{served['url']}/v1", model="raypipe",
                                               api_key_env="RAYPIPE_TEST_API_KEY", cache_dir=None, max_concurrency=2)]
    summary = Pipeline(cfg).run()
    assert "round_0/sft" in summary["stages_reused"], "the e2e run's SFT checkpoint stands in"
    (round_1,) = summary["rounds"]
    correct = pd.read_parquet(cfg.run_dir / "round_1" / "correct" / "data.parquet")
    assert {"policy", "model_0:raypipe"} <= set(correct["source"]) <= {"policy", "model_0:raypipe", "evolved"}
    assert (correct["status"] == "kept").sum() == round_1["corrections_kept"] > 0
    manifest = json.loads((cfg.run_dir / "round_1" / "correct" / "manifest.json").read_text())["metrics"]
    assert manifest["usage"]["model_0:raypipe"]["requests"] > 0
    assert manifest["evolved_questions"] == 8 and manifest["pseudo_labelled"] >= 1, "the policy's votes label some"
    assert manifest["evolved_mistakes"] == (correct["source"] == "evolved").sum()
    built = pd.read_parquet(cfg.run_dir / "round_1" / "build" / "data.parquet")
    assert (built["source"] == "cot").sum() == cfg.task.sft_problems
    assert built["source"].str.startswith("correction:").sum() > 0
    assert round_1["train_steps"] == 10
    assert round_1["accuracy_after"] >= round_1["accuracy_before"] - 0.15, "ten steps on corrections keep the policy"
