"""``medrega-data``: check annotation files and meta registries, convert datasets, show prompts.

Every problem is one ``FILE:LINE: reason: message`` line; the exit status is 0 (no problem), 1 (problems found, or
nothing written) or 2 (a usage error or failure, one line on stderr). Also ``python -m internvl.data``; docs/data-io.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from internvl.cli_support import UsageError, non_negative_int, positive_int, run_cli
from internvl.data.convert import CONVERTERS, ConvertError, get_converter
from internvl.data.prompts import get_prompt, list_tasks
from internvl.data.records import ALLOW_LINKS_ENV, IMAGE_CHECKS, BadRecordError, ProblemTally, RecordChecker, iter_records
from internvl.data.registry import MetaFileError, load_meta
from internvl.io_safety import check_output_file
from internvl.offline import enforce_offline

__all__ = ["main", "build_parser"]


def _token_length_factory(args: argparse.Namespace) -> Callable[[str], Callable[[dict], int]] | None:
    """``base_prompt -> token_length`` using the encoder and a local tokenizer, or None without --max-length."""
    if args.max_length is None:
        if args.tokenizer:
            raise UsageError("--tokenizer is only used with --max-length N (the token-length check)")
        return None
    if not args.tokenizer:
        raise UsageError("--max-length needs --tokenizer DIR (a local tokenizer directory)")
    # lazy: only --max-length needs them, and they import torch and transformers (about 1 s)
    from internvl.data.encode import make_token_length
    from internvl.tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    return lambda base_prompt: make_token_length(tokenizer, base_prompt=base_prompt)


def _check_targets(args: argparse.Namespace) -> list[tuple[str, Path, Path | None, str]]:
    """``(label, annotation, image root, base_prompt)`` for each file to check: a meta file's datasets, or one jsonl."""
    path = Path(args.path)
    if path.suffix != ".json":
        return [(str(path), path, Path(args.image_root) if args.image_root else None, "")]
    if args.image_root:
        raise UsageError("check: --image-root applies to a .jsonl; a meta file names each dataset's root")
    specs = load_meta(path, base_dir=args.base_dir)
    return [(name, spec.annotation, spec.root, spec.base_prompt) for name, spec in specs.items()]


def cmd_check(args: argparse.Namespace) -> int:
    if args.allow_links_outside_root:
        os.environ[ALLOW_LINKS_ENV] = "1"
    factory = _token_length_factory(args)
    try:
        targets = _check_targets(args)
    except MetaFileError as exc:
        print(f"{exc}\n1 problem: meta file")
        return 1
    total = ProblemTally()
    for label, annotation, root, base_prompt in targets:
        checker = RecordChecker(image_root=root, image_check=args.images, max_length=args.max_length,
                                token_length=factory(base_prompt) if factory else None)
        seen, kept = total.seen, total.kept
        try:  # lenient: every problem is shown as it comes; strict: the first bad record's, then the file stops
            for _ in iter_records(annotation, checker, strict=args.strict, tally=total, on_problem=print):
                pass
        except BadRecordError as exc:
            print(exc)
            total.add(exc.problems)
        if len(targets) > 1:
            print(f"# {label}: {total.kept - kept} of {total.seen - seen} records ok")
        if args.strict and total.by_reason:
            break
    if total.by_reason:
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(total.by_reason.items()))
        stop = " (stopped at the first bad record: --strict)" if args.strict else ""
        n_problems = sum(total.by_reason.values())
        print(f"{total.skipped} of {total.seen} record(s) bad, {n_problems} problem(s){stop}: {counts}")
        return 1
    print(f"ok: {total.kept} record(s), no problems")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    converter = get_converter(args.format)
    inputs = [v for k, v in vars(args).items() if k != "out" and isinstance(v, str) and v and os.path.exists(v)]
    check_output_file(args.out, inputs=inputs, overwrite=True, what="--out")  # never the converter's own input
    try:
        report = converter.run(args)
    except ConvertError as exc:
        raise ConvertError(f"convert {args.format}: {exc}") from None
    for n, problem in enumerate(report.problems):
        if args.max_print and n >= args.max_print:
            print(f"... {len(report.problems) - n} more problem lines not shown (--max-print)")
            break
        print(problem)
    print(report.summary())
    if report.written == 0:
        print(f"medrega-data convert {args.format}: nothing was written", file=sys.stderr)
        return 1
    return 1 if args.strict and report.n_skipped else 0


def cmd_prompts(args: argparse.Namespace) -> int:
    if not args.task:
        for task in list_tasks():
            tp = get_prompt(task, args.lang)
            print(f"{task:22s} {tp.description}")
        return 0
    tp = get_prompt(args.task, args.lang)  # an unknown task: PromptError, one line from run_cli
    print(f"task: {tp.task} ({tp.lang})  source: {tp.source}\nfile: {tp.file}\nbase_prompt: {tp.base_prompt!r}")
    questions = tp.questions if isinstance(tp.questions, dict) else {"questions": tp.questions}
    for key, templates in questions.items():
        for t in templates:
            print(f"{key}: {t!r}")
    print(f"answer: {tp.answer!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medrega-data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a meta_file.json or an annotation .jsonl")
    check.add_argument("path", help="meta_file.json or annotation .jsonl")
    check.add_argument("--image-root", help="image directory for a .jsonl (default: the jsonl's directory)")
    check.add_argument("--base-dir", help="directory that relative meta-file paths are resolved against (default: cwd)")
    check.add_argument("--strict", action="store_true", help="stop at the first bad record")
    check.add_argument("--images", choices=IMAGE_CHECKS, default="decode",
                       help="image check: none, exists, header, or decode (default: full decode)")
    check.add_argument("--max-length", type=positive_int,
                       help="flag records longer than this many tokens (needs --tokenizer)")
    check.add_argument("--tokenizer", help="local tokenizer directory for --max-length")
    check.add_argument("--allow-links-outside-root", action="store_true",
                       help=f"follow symbolic links that lead outside the image root (same as {ALLOW_LINKS_ENV}=1)")
    check.set_defaults(func=cmd_check)

    convert = sub.add_parser("convert", help="convert a dataset to MedRegInstruct jsonl")
    formats = convert.add_subparsers(dest="format", required=True)
    for name in CONVERTERS:
        converter = get_converter(name)
        p = formats.add_parser(name, help=converter.help, description=converter.doc)
        converter.add_arguments(p)
        p.add_argument("--max-print", type=non_negative_int, default=50,
                       help="print at most this many skipped items (0 = all)")
        p.set_defaults(func=cmd_convert)

    prompts = sub.add_parser("prompts", help="list prompt tasks or show one task's wording")
    prompts.add_argument("task", nargs="?")
    prompts.add_argument("--lang", choices=["en", "zh"], default="en")
    prompts.set_defaults(func=cmd_prompts)
    return parser


def _main(argv: Sequence[str] | None) -> int:
    enforce_offline()
    args = build_parser().parse_args(argv)
    return int(args.func(args))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medrega-data`` console script; returns the exit status (failures: one line, 2)."""
    return run_cli("medrega-data", _main, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
