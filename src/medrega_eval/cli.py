"""`medrega-eval` command line: `score` an existing prediction file, `run` a model on benchmarks, `list` benchmarks.

Usage examples: docs/evaluation.md. Exit status: 0 done; 2 bad arguments or bad input (missing files or data,
unreadable benchmark file, a model that cannot be loaded, an --out that would mix runs): one line on stderr.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
from pathlib import Path

from internvl.cli_support import UsageError, add_generation_arguments, positive_int, run_cli
from internvl.io_safety import check_output_dir
from internvl.offline import enforce_offline
from medrega_eval.benchmarks import Benchmark, MissingData, data_dir_from, load_registry, reference_options
from medrega_eval.io import LANGS, ScoreInputError, read_predictions
from medrega_eval.report import OUTPUT_FILES, protocol_info, write_outputs
from medrega_eval.score import SUBTYPES, TASKS, TOP_METRICS, ScoreConfig, record_lang, score_records, summarize

__all__ = ["main", "build_parser"]


def _add_common(p: argparse.ArgumentParser, outputs: bool = True) -> None:
    """The registry options of every subcommand; with `outputs`, the --out, --compat and BERTScore ones."""
    p.add_argument("--benchmark-file", action="append", default=[], type=Path, metavar="YAML",
                   help="register more benchmarks (same format as the shipped registry); repeatable")
    p.add_argument("--data-dir", type=Path, default=None, help="root of the benchmark data (default $MEDREGA_DATA)")
    if not outputs:
        return
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--compat", choices=["medrega"], default=None,
                   help="reproduce the original MedRegA scorers (see docs/evaluation.md)")
    p.add_argument("--bertscore-model", default=None, metavar="DIR",
                   help="local model directory for BERTScore (e.g. a saved deberta-xlarge-mnli); never downloaded")
    p.add_argument("--bertscore-layer", type=int, default=None, metavar="N",
                   help="BERTScore hidden layer (default: the last; with --compat medrega 40 for en, 9 for zh)")


def build_parser() -> argparse.ArgumentParser:
    """The `medrega-eval` parser: `score`, `run` and `list` subcommands."""
    parser = argparse.ArgumentParser(prog="medrega-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score a prediction file (our records or the original MedRegA formats)")
    s.add_argument("--task", choices=TASKS, help="task to score (default: the --benchmark's task)")
    s.add_argument("--pred", required=True, type=Path,
                   help="predictions: JSON list or JSON lines; several files comma-separated are pooled "
                        "(as the original scorers pool --ans_file lists)")
    s.add_argument("--subtype", choices=SUBTYPES, default=None, help="Text-to-Region subtype")
    s.add_argument("--lang", choices=[*LANGS, "auto"], default=None, help="language (default: per record)")
    s.add_argument("--benchmark", default=None, help="take task/subtype/options/metrics from this registered split")
    s.add_argument("--options", default=None, help="classification options, comma-separated")
    s.add_argument("--multilabel", action="store_true", help="classification with several labels per answer")
    s.add_argument("--metrics", default=None, help="report metrics to compute, comma-separated (e.g. skip meteor)")
    s.add_argument("--image-root", type=Path, default=None,
                   help="the benchmark's image folder: report.html embeds only images inside it (default: the "
                        "--benchmark's image folder; none without either)")
    _add_common(s)

    r = sub.add_parser("run", help="generate answers for registered benchmarks, then score them")
    r.add_argument("--model", required=True, help="local model directory (safetensors)")
    r.add_argument("--benchmark", required=True, help="benchmark name(s), comma-separated")
    r.add_argument("--batch-size", type=positive_int, default=8)
    add_generation_arguments(r)
    r.add_argument("--limit", type=positive_int, default=None, help="only the first N samples of each benchmark")
    r.add_argument("--no-score", action="store_true", help="generate only")
    r.add_argument("--overwrite", action="store_true",
                   help="start over in an --out that holds predictions (made with other settings); the old files "
                        "are moved to NAME/replaced-N/")
    r.add_argument("--regional-cot", action="store_true",
                   help="Regional CoT (paper §5): first ask for the regions relevant to each question, then ask the "
                        "question again with those boxes in the prompt; the step-one regions are kept per sample")
    _add_common(r)

    _add_common(sub.add_parser("list", help="list registered benchmarks and whether their data is present"),
                outputs=False)
    return parser


def _pred_files(pred: Path) -> list[Path]:
    """`--pred`: one file, or several comma-separated (a file whose own name has a comma is taken as one)."""
    try:
        whole = pred.is_file()
    except OSError:  # a name the OS refuses (too long, ...): a list is split; one such name read_predictions reports
        whole = False
    return [pred] if whole or "," not in str(pred) else [Path(p) for p in str(pred).split(",") if p]


def _score_config(args: argparse.Namespace, bench: Benchmark | None, records: list) -> ScoreConfig:
    """The command line's settings over the --benchmark's (its task, language, subtype, options, metrics)."""
    cfg = bench.score_config() if bench else ScoreConfig(task=args.task)
    if cfg.options == "from_references" and not args.options:  # per language, as `run` scores the split
        lang_cfg = dataclasses.replace(cfg, lang=args.lang if args.lang != "auto" else cfg.lang)
        cfg.options = reference_options([(record_lang(r, lang_cfg), r.reference) for r in records],
                                        args.multilabel or cfg.multilabel)
    given = {"task": args.task, "lang": args.lang if args.lang != "auto" else None, "subtype": args.subtype,
             "options": args.options and [o.strip() for o in args.options.split(",") if o.strip()],
             "metrics": args.metrics and [m.strip() for m in args.metrics.split(",")],
             "multilabel": args.multilabel or None}
    return dataclasses.replace(cfg, compat=args.compat, bertscore_model=args.bertscore_model,
                               bertscore_layer=args.bertscore_layer, **{k: v for k, v in given.items() if v})


def _benchmarks(args: argparse.Namespace, names: list[str]) -> list[Benchmark]:
    """The registered benchmarks `names` (UsageError for an unknown one)."""
    registry = load_registry(args.benchmark_file)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise UsageError(f"{args.command}: unknown benchmark(s) {unknown}; see `medrega-eval list`")
    return [registry[n] for n in names]


def _cmd_score(args: argparse.Namespace) -> int:
    bench = _benchmarks(args, [args.benchmark])[0] if args.benchmark else None
    if not (args.task or bench):
        raise UsageError("score: give --task or --benchmark")
    pred_files = _pred_files(args.pred)
    check_output_dir(args.out, inputs=pred_files, must_be_empty=False, inputs_inside_ok=True, what="--out")
    overwritten = [p for p in pred_files for name in OUTPUT_FILES if (args.out / name).resolve() == p.resolve()]
    if overwritten:
        raise UsageError(f"--out {args.out} would overwrite the prediction file {overwritten[0]}")
    image_root = args.image_root
    if image_root is None and bench is not None:
        try:
            image_root = bench.locate(data_dir_from(args.data_dir))[1]
        except MissingData:
            image_root = None  # the report then shows no images
    records, problems, seen = [], [], {}  # default mode: an id of an earlier file is a duplicate too
    for path in pred_files:
        recs, probs = read_predictions(path, keep_duplicates=args.compat == "medrega", seen=seen)
        records += recs
        problems += probs
    cfg = _score_config(args, bench, records)
    if cfg.task == "classification" and cfg.options is None and not any(r.options for r in records):
        raise UsageError("score: classification needs options: records with an 'options' field, --options or "
                         "--benchmark")
    result = score_records(records, cfg, problems)  # ScoreInputError: bad options for these records
    if args.compat == "medrega":
        result.counts["repeated_ids_scored"] = len(records) - len({r.id for r in records})
    protocol = protocol_info(prediction_file=",".join(str(p) for p in pred_files),
                             prediction_sha256=",".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in pred_files),
                             task=cfg.task, compat=args.compat)
    summary = summarize(result, cfg, protocol, benchmark=args.benchmark)
    write_outputs(args.out, summary, result.rows, image_root=image_root)
    _print_summary(summary)
    return 0


def _print_summary(summary: dict) -> None:
    shown = {k: summary[k] for k in TOP_METRICS if k in summary}
    print(json.dumps({"benchmark": summary.get("benchmark"), "task": summary["task"], **shown,
                      "counts": summary["counts"]}, ensure_ascii=False))
    for name, why in summary.get("unavailable", {}).items():
        print(f"medrega-eval: {name} not computed: {why}", file=sys.stderr)
    if summary["problems"]:
        print(f"medrega-eval: {len(summary['problems'])} problem(s), e.g. {summary['problems'][0]}", file=sys.stderr)


def _cmd_run(args: argparse.Namespace) -> int:
    from internvl.inference import GenerationSettings  # lazy: torch and transformers, which `score` never needs
    from medrega_eval.run import RunConfig, run_benchmarks

    benchmarks = _benchmarks(args, [n.strip() for n in args.benchmark.split(",") if n.strip()])
    settings = GenerationSettings.from_args(args)
    cfg = RunConfig(out=args.out, data_dir=data_dir_from(args.data_dir), batch_size=args.batch_size,
                    limit=args.limit, compat=args.compat, score=not args.no_score,
                    bertscore_model=args.bertscore_model, bertscore_layer=args.bertscore_layer,
                    overwrite=args.overwrite, regional_cot=args.regional_cot)
    try:
        summaries = run_benchmarks(args.model, benchmarks, cfg, settings, dtype=args.dtype,
                                   device_map=args.device_map, load_in_8bit=args.load_in_8bit,
                                   load_in_4bit=args.load_in_4bit)
    except ScoreInputError as exc:  # the predictions are kept; `score` can rescore them with the right options
        raise UsageError(f"run: {exc} (predictions kept in {args.out})") from None
    for summary in summaries.values():
        _print_summary(summary)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    data_dir = data_dir_from(args.data_dir)
    for name, bench in sorted(load_registry(args.benchmark_file).items()):
        try:
            ann, _ = bench.locate(data_dir)
            status = f"ready ({ann})"
        except MissingData:
            status = "missing data"
        extra = f" {bench.subtype}" if bench.subtype else ""
        print(f"{name:28s} {bench.task + extra:20s} {bench.lang:4s} {status}")
    return 0


def _main(argv: list[str] | None) -> int:
    enforce_offline()
    args = build_parser().parse_args(argv)
    try:
        return {"score": _cmd_score, "run": _cmd_run, "list": _cmd_list}[args.command](args)
    except ImportError as exc:  # an optional dependency (metric package, bitsandbytes) is missing
        raise UsageError(str(exc)) from exc


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `medrega-eval` console script (failures: one line on stderr, exit status 2)."""
    return run_cli("medrega-eval", _main, argv)
