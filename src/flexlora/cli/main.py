"""The ``flexlora`` command line: ``run``, ``eval``, ``export``, ``config`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_FEDERATION_FAILED = 3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexlora",
        description="Federated LoRA fine-tuning with heterogeneous client ranks (FlexLoRA and baselines).",
    )
    from flexlora import __version__

    p.add_argument("--version", action="version", version=f"flexlora {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federated fine-tuning (the default config needs no arguments)")
    run.add_argument("config", nargs="?", help="TOML or YAML config file (default: the built-in demo)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set rounds=5 --set train.lr=1e-3 (repeatable)")
    run.add_argument("--output", type=Path, help="run directory (default: runs/<timestamp>)")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a killed or finished run from its last checkpoint (only `rounds`, `min_clients` "
                          "and [flower] settings may change)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    run.add_argument("--engine", choices=("local", "flower-sim", "flower-inprocess"), default="local",
                     help="local: this process (default); flower-sim: Flower's Ray simulation with one virtual "
                          "SuperNode per client (needs flexlora[flower]); flower-inprocess: the Flower ServerApp and "
                          "ClientApps in this process, without Ray (for debugging). For real deployments see "
                          "README 'Running on many machines'.")

    ev = sub.add_parser("eval", help="evaluate a run's global model on the unseen tasks")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override eval.* keys, e.g. --set eval.max_examples_per_task=0")
    ev.add_argument("--base", action="store_true", help="evaluate the base model instead (no adapter)")
    ev.add_argument("--json", type=Path, help="also write the result to this file")
    ev.add_argument("--rescore", action="store_true",
                    help="score the run's saved answers (RUN_DIR/eval/*.jsonl) again with the given scoring "
                         "settings, e.g. --set eval.stem=true, without loading the model or generating")
    ev.add_argument("--answers", metavar="NAME", action="append", default=[],
                    help="with --rescore: only RUN_DIR/eval/NAME.jsonl (repeatable; default: every file)")

    sh = sub.add_parser("show", help="print a run's saved answers beside their references, a few per task")
    sh.add_argument("run_dir", type=Path)
    sh.add_argument("--answers", metavar="NAME", default=None,
                    help="the answers file RUN_DIR/eval/NAME.jsonl (default: the last round's, round_<N>)")
    sh.add_argument("--per-task", type=_positive_int, default=3, help="answers shown per task (default 3)")
    sh.add_argument("--task", action="append", default=[], help="only this task (repeatable)")

    ex = sub.add_parser("export", help="export a run's global adapter (PEFT format) and optionally a merged model")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("--rank", type=_positive_int, default=None,
                    help="export rank, capped per module at min(out, in) (default: the run's export.rank)")
    ex.add_argument("--output", type=Path, help="adapter directory (default: RUN_DIR/adapter)")
    ex.add_argument("--merged", type=Path, metavar="DIR", help="also write the merged model to DIR")

    cf = sub.add_parser("config", help="print every config key with its default and help text")
    cf.add_argument("--toml", action="store_true", help="print the default config as TOML instead")

    bench = sub.add_parser("bench", help="benchmarks built on the engines (quality: the paper's comparison)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    q = bench_sub.add_parser(
        "quality", help="the paper's comparison (methods x rank distributions x seeds) as one resumable grid",
        description="Run every row of a preset's grid with the in-process engine into OUTPUT/runs/<row>, collect "
                    "OUTPUT/results.jsonl and write OUTPUT/results.md with plots. Running again into the same "
                    "OUTPUT skips finished rows and resumes an interrupted one from its checkpoint. "
                    "See docs/BENCHMARKS.md.")
    q.add_argument("--preset", required=True, metavar="smoke|quick|paper|dp-scale",
                   help="smoke: every method once on builtin:tiny-llama (about a minute); quick: SmolLM2-135M on "
                        "Natural Instructions (2-6 min per run, under 3 h per data set on 2 cores); paper: the "
                        "paper's protocol for a GPU (needs --set model=...); dp-scale: client-level DP with 80 of "
                        "1,600 clients per round on Dolly-15k (about 10 min per run)")
    q.add_argument("--data", action="append", default=[], metavar="NAME[=PATH]",
                   help="a data set to run (demo, ni, dolly), optionally at PATH; repeatable. Given, exactly these "
                        "run; without it the preset's own (smoke: demo, quick: ni, paper: ni and dolly) at their "
                        "default paths under ../shared/data")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key in every run of the grid, as for flexlora run (repeatable)")
    q.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                   help="run only the rows whose id contains SUBSTRING, e.g. ni/FedIT/homo (repeatable)")
    q.add_argument("--force", action="store_true",
                   help="run the selected rows again from the start, discarding their results and run directories")
    q.add_argument("--list", action="store_true", help="print the selected rows and their overrides; run nothing")
    q.add_argument("--output", type=Path, metavar="DIR",
                   help="the grid's directory (created; reused to resume); required unless --list")
    return p


def _resume_config(run_dir: Path, overrides: list[str]):
    from flexlora.engines.config import ConfigError, load_config

    cfg_path = run_dir / "config.toml"
    if not cfg_path.is_file():
        raise ConfigError(f"{run_dir} holds no config.toml; is it a flexlora run directory?")
    return load_config(cfg_path, overrides)


def cmd_run(args: argparse.Namespace) -> int:
    from flexlora.engines.config import load_config
    from flexlora.engines.simulation import Simulation, default_run_dir

    if args.resume is not None:
        if args.config or args.output:
            _log("error: --resume takes the run's own config and directory; drop CONFIG/--output")
            return EXIT_BAD_INPUT
        cfg = _resume_config(args.resume, args.overrides)
        run_dir = args.resume
    else:
        cfg = load_config(args.config, args.overrides)
        run_dir = args.output or default_run_dir()
    resume = args.resume is not None
    if args.engine == "local":
        result = Simulation(cfg, run_dir, resume=resume, progress=not args.no_progress, log=_log).run()
    elif args.engine == "flower-sim":
        from flexlora.engines.flower.simulation import run_flower_simulation

        result = run_flower_simulation(cfg, run_dir, resume=resume, log=_log)
    else:
        from flexlora.engines.flower.inprocess import run_inprocess

        result = run_inprocess(cfg, run_dir, resume=resume, log=_log)
    print(result.summary)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flexlora.engines.config import ConfigError
    from flexlora.engines.simulation import Simulation

    bad = [o for o in args.overrides if not o.split("=", 1)[0].strip().startswith("eval.")]
    if bad:
        raise ConfigError(f"flexlora eval only accepts eval.* overrides, got {bad}")
    if args.json is not None and args.json.is_dir():
        raise ConfigError(f"--json {args.json} is a directory; give a file name")
    if args.rescore:
        return _rescore(args)
    if args.answers:
        raise ConfigError("--answers goes with --rescore (a fresh evaluation writes RUN_DIR/eval/eval.jsonl)")
    # The run opens with its own config (its checkpoint's fingerprint covers eval.* too); the
    # eval overrides then only rebuild the eval set.
    cfg = _resume_config(args.run_dir, [])
    sim = Simulation(cfg, args.run_dir, resume=True, progress=False, log=_log, read_only=True)
    if args.overrides:
        sim.use_eval_settings(_resume_config(args.run_dir, args.overrides).eval)
    res = sim.evaluation.evaluate(base=args.base, answers="eval_base" if args.base else "eval")
    text = json.dumps(res, indent=2, sort_keys=True)
    print(text)
    if args.json:
        from flexlora.engines.checkpoint import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0


def _answer_files(run_dir: Path, names: list[str]) -> list[Path]:
    from flexlora.engines.config import ConfigError

    folder = run_dir / "eval"
    if names:
        files = [folder / f"{n}.jsonl" for n in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            known = sorted(p.stem for p in folder.glob("*.jsonl")) if folder.is_dir() else []
            raise ConfigError(f"no saved answers at {missing[0]}; this run has {known or 'none'}")
        return files
    files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    if not files:
        raise ConfigError(f"{run_dir} has no saved answers ({folder}/*.jsonl): runs write them from this version on; "
                          f"run `flexlora eval {run_dir}` to evaluate it and save them")
    return files


def _rescore(args: argparse.Namespace) -> int:
    from flexlora.engines.config import ConfigError
    from flexlora.engines.evaluation import read_answers, rescore

    if args.base:
        raise ConfigError("--rescore scores saved answers; --base does not apply (rescore eval_base.jsonl with "
                          "--answers eval_base)")
    cfg = _resume_config(args.run_dir, args.overrides)
    out = {}
    for path in _answer_files(args.run_dir, args.answers):
        try:
            out[path.stem] = rescore(read_answers(path), stem=cfg.eval.stem)
        except ValueError as exc:
            raise ConfigError(f"{exc}; the file is not one flexlora wrote (delete it, or evaluate again)") from None
    text = json.dumps(out, indent=2, sort_keys=True)
    print(text)
    if args.json:
        from flexlora.engines.checkpoint import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from flexlora.engines.config import ConfigError
    from flexlora.engines.evaluation import read_answers

    if args.answers is None:
        rounds = sorted((int(p.stem.split("_")[1]), p.stem) for p in (args.run_dir / "eval").glob("round_*.jsonl")
                        if p.stem.split("_")[1].isdigit() and p.stem.count("_") == 1) \
            if (args.run_dir / "eval").is_dir() else []
        if not rounds:
            _answer_files(args.run_dir, [])  # names the problem and the fix
            raise ConfigError(f"{args.run_dir} has no round_<N> answers; choose one with --answers")
        name = rounds[-1][1]
    else:
        name = args.answers
    path = _answer_files(args.run_dir, [name])[0]
    try:
        records = read_answers(path)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    by_task: dict[str, list[dict]] = {}
    for r in records:
        if not args.task or r["task"] in args.task:
            by_task.setdefault(r["task"], []).append(r)
    if args.task and not by_task:
        raise ConfigError(f"no answers for task(s) {args.task} in {path}; its tasks are "
                          f"{sorted({r['task'] for r in records})[:10]}")
    print(f"{path} ({len(records)} answers, {len(by_task)} tasks)")
    for task in sorted(by_task):
        recs = by_task[task]
        mean = sum(float(r.get("rougeL", 0.0)) for r in recs) / len(recs)
        print(f"\n== {task}: Rouge-L {mean:.4f} over {len(recs)} answers")
        for r in recs[: args.per_task]:
            refs = " | ".join(str(x) for x in r["references"])
            print(f"  [{r.get('id', '')}] Rouge-L {float(r.get('rougeL', 0.0)):.3f}")
            print(f"    answer:    {r['prediction']!r}")
            print(f"    reference: {refs!r}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flexlora.engines.config import ConfigError
    from flexlora.engines.simulation import Simulation
    from flexlora.training.export import (
        ADAPTER_MARKER,
        MERGED_MARKER,
        check_replaceable,
        save_merged_model,
        save_peft_adapter,
    )

    out = args.output or (args.run_dir / "adapter")
    run_dir = args.run_dir.expanduser().absolute()
    # Every target is checked before anything is loaded or written: an export must never replace
    # the run it comes from, nor a directory it did not write.
    for target, marker, flag in ((out, ADAPTER_MARKER, "--output"), (args.merged, MERGED_MARKER, "--merged")):
        if target is None:
            continue
        t = check_replaceable(target, marker)
        if t == run_dir or run_dir.is_relative_to(t):
            raise ConfigError(f"{flag} {target} would replace the run directory {args.run_dir}; choose a directory "
                              "outside it (or RUN_DIR/adapter, the default)")
    if args.merged is not None and Path(args.merged).expanduser().absolute() == Path(out).expanduser().absolute():
        raise ConfigError("--output and --merged name the same directory; give them different ones")
    cfg = _resume_config(args.run_dir, [])
    sim = Simulation(cfg, args.run_dir, resume=True, progress=False, log=_log, read_only=True)
    if sim.state is None:
        raise ConfigError(f"{args.run_dir} has no global adapter yet (after round {sim.start_round - 1}, aggregator "
                          f"{cfg.aggregator!r} has built none: SLoRA builds it at the end of its stage 1); "
                          "continue the run with --resume first")
    factors = sim.global_factors(args.rank)
    save_peft_adapter(sim.model, factors, cfg.lora.alpha, out, base_model_name_or_path=cfg.model,
                      rslora=cfg.lora.rslora)
    _log(f"adapter written to {out}")
    if args.merged:
        save_merged_model(sim.model, sim.tokenizer, factors, cfg.lora.alpha, args.merged, rslora=cfg.lora.rslora)
        _log(f"merged model written to {args.merged}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from flexlora.engines.config import RunConfig, describe, to_toml

    print(to_toml(RunConfig()) if args.toml else describe())
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from flexlora.bench import BenchError, plan_quality, run_quality

    try:
        if args.list:
            for plan in plan_quality(args.preset, data=args.data, sets=args.overrides, only=args.only, log=_log):
                print(plan.row.id, " ".join(plan.row.sets))
            return 0
        if args.output is None:
            raise BenchError("--output DIR is required (the grid's directory; run again into it to resume)")
        res = run_quality(args.preset, args.output, data=args.data, sets=args.overrides, only=args.only,
                          force=args.force, log=_log)
    except KeyboardInterrupt:
        _log(f"interrupted; run the same command again to continue: finished rows are kept in "
             f"{args.output / 'results.jsonl'}, and the interrupted row resumes from its last checkpoint")
        return 130
    except BenchError as exc:
        _log(f"error: {exc}")
        return EXIT_BAD_INPUT
    print(args.output / "results.md")
    return EXIT_FEDERATION_FAILED if res.failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from flexlora.core.types import AggregationError
    from flexlora.data.errors import DataError
    from flexlora.engines.checkpoint import CheckpointError
    from flexlora.engines.config import ConfigError
    from flexlora.engines.rounds import FederationError
    from flexlora.training.models import ModelLoadError, ModelSpecError

    handlers = {"run": cmd_run, "eval": cmd_eval, "show": cmd_show, "export": cmd_export, "config": cmd_config,
                "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, CheckpointError, AggregationError, FileNotFoundError, FileExistsError,
            IsADirectoryError, NotADirectoryError, ModelLoadError, ModelSpecError) as exc:
        _log(f"error: {exc}")
        return EXIT_BAD_INPUT
    except FederationError as exc:
        _log(f"error: {exc}")
        return EXIT_FEDERATION_FAILED
    except ImportError as exc:
        if "flwr" not in str(exc):
            raise
        _log(f"error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _log("interrupted; continue with --resume RUN_DIR")
        return 130


if __name__ == "__main__":
    sys.exit(main())
