"""`raypipe run | plan | compare | eval | serve | config show`: the command line."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from raypipe.config import ConfigError, EngineConfig, TaskConfig, describe, load_config
from raypipe.console import run_console
from raypipe.data.benchmarks import DataError
from raypipe.engines.text import EngineError
from raypipe.results import begin, keep

log = logging.getLogger("raypipe")
VERBOSE_HELP = ("also show the libraries' output (Ray workers, vLLM, DeepSpeed, warnings) on the terminal; it is "
                "always in <run>/logs/console.log")
RESULTS_HELP = ("keep what the experiment wrote in this folder, e.g. results/quickstart, with record.json "
                "(command, git commit, machine, date, wall time): what `make results` renders into the docs")


def _fraction(text: str) -> float:
    """An argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is not between 0 and 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raypipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline: initial SFT, then R rounds of the method")
    run.add_argument("config", help="YAML file under conf/")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.zero_stage=3 rounds=2")
    run.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    run.add_argument("--results", type=Path, default=None, help=RESULTS_HELP)
    plan = sub.add_parser("plan", help="estimated GPU memory per stage (from the model's config.json); "
                                       "refuses what does not fit")
    plan.add_argument("config", help="YAML file under conf/")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, as for `raypipe run`")
    ev = sub.add_parser("eval", help="greedy accuracy of any HF model directory on a JSONL benchmark")
    ev.add_argument("--model", required=True, help="local HF model directory")
    ev.add_argument("--data", required=True, help="JSONL file with `question` and `answer` fields")
    ev.add_argument("--kind", required=True, choices=["gsm8k", "math", "synthetic"], help="answer grader")
    ev.add_argument("--limit", type=int, default=None, help="first N rows only")
    ev.add_argument("--out", default=None, help="folder for predictions.parquet and rejected rows")
    ev.add_argument("--backend", default="vllm", choices=["vllm", "hf"], help="generation engine")
    ev.add_argument("--max-new-tokens", type=int, default=512, help="cap on each generated answer")
    ev.add_argument("--max-rejected-fraction", type=_fraction, default=1.0,
                    help="stop when more than this share of the rows is bad (default 1: evaluate the usable rows)")
    ev.add_argument("--system-prompt", default=None, help="system message for a model with a chat template")
    ev.add_argument("--instruction", default=None,
                    help="line added after each question (as task.instruction), e.g. 'Please reason step by step.'")
    cmp = sub.add_parser("compare", help="every method from one SFT checkpoint, equal steps, several seeds")
    cmp.add_argument("config", help="comparison YAML, e.g. conf/compare.yaml")
    cmp.add_argument("overrides", nargs="*", help="dotted overrides of the comparison, e.g. seeds=[0,1]")
    cmp.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    cmp.add_argument("--results", type=Path, default=None, help=RESULTS_HELP)
    srv = sub.add_parser("serve", help="serve a run's latest model (or any model folder): OpenAI API + demo page")
    srv.add_argument("model", help="a run folder, e.g. runs/quickstart, or a Hugging Face model folder")
    srv.add_argument("overrides", nargs="*", help="ServeConfig fields, e.g. max_tokens=256 device=cpu")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    srv.add_argument("--port", type=int, default=8000, help="HTTP port")
    show = sub.add_parser("config", help="print every config field with its default and meaning")
    show.add_argument("action", choices=["show"])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            cfg = load_config(args.config, args.overrides)
            if args.results and cfg.method == "realign":
                raise ConfigError("--results keeps a pipeline run's summary.json; a realign run writes none")
            if cfg.train.use_gpu and cfg.method != "realign":  # refuse what cannot fit before anything starts
                from raypipe.plan import check_fits, plan_run

                check_fits(plan_run(cfg))
            start = begin(args.results, "raypipe", argv) if args.results else None
            with run_console(cfg.run_dir / "logs", args.verbose):
                if cfg.method == "realign":
                    from raypipe.realign.stage import run_realign

                    run_realign(cfg)
                else:
                    from raypipe.pipeline import Pipeline  # heavy imports only once the config is known to be good

                    Pipeline(cfg).run()
            if start is not None:
                keep(start, [cfg.run_dir / "summary.json", cfg.run_dir / "config.yaml"])
        elif args.command == "plan":
            from raypipe.plan import check_fits, plan_run, print_plan

            memory = plan_run(load_config(args.config, args.overrides))
            print_plan(memory)
            check_fits(memory)
        elif args.command == "compare":
            from raypipe.compare import load_compare, run_compare

            cmp = load_compare(args.config, args.overrides)
            start = begin(args.results, "raypipe", argv) if args.results else None
            root = Path(cmp.output_dir) / cmp.name
            with run_console(root / "logs", args.verbose):
                run_compare(cmp)
            if start is not None:
                keep(start, [root / "compare.json", root / "compare.md", root / "config.yaml"])
        elif args.command == "eval":
            from raypipe.evaluate import run_benchmark_eval

            engine = EngineConfig(backend=args.backend, max_model_len=4096)
            prompt = TaskConfig(source="dataset", answer_kind=args.kind, system_prompt=args.system_prompt,
                                instruction=args.instruction)
            run_benchmark_eval(Path(args.model), Path(args.data), prompt, args.limit, engine,
                               args.max_new_tokens, Path(args.out) if args.out else None, args.max_rejected_fraction)
        elif args.command == "serve":
            from raypipe.serve import serve_forever

            serve_forever(args.model, args.overrides, args.host, args.port)
        else:
            print("\n".join(describe()))
    except ConfigError as err:
        print(f"raypipe: config error: {err}", file=sys.stderr)
        return 2
    except (DataError, EngineError) as err:
        print(f"raypipe: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
