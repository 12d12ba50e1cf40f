"""One wrapper for every console script (``run_cli``): expected failures (the bad-input error types of
:data:`EXPECTED_ERRORS`, looked up only once their module is imported so this module imports nothing heavy, and any
``OSError`` about a named file) are one line and exit 2, bugs keep their traceback; plus argparse ``type=`` helpers.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DTYPE_RULE", "EXPECTED_ERRORS", "UsageError", "add_generation_arguments", "expected_error_types",
           "non_negative_float", "non_negative_int", "one_line", "port_number", "positive_int", "run_cli"]

# `internvl.inference.default_dtype` in words, for --help texts that must not import torch
DTYPE_RULE = "float32 on CPU, bfloat16 on GPUs that support it, else float16"

EXIT_EXPECTED = 2


class UsageError(ValueError):
    """A bad command-line request found after parsing (e.g. two options that do not fit together)."""


#: ``module:Class`` of every error type that means "bad input", not "bug".
EXPECTED_ERRORS: tuple[str, ...] = (
    "internvl.cli_support:UsageError",
    "internvl.io_safety:OutputPathError",
    "internvl.data.records:BadRecordError",
    "internvl.data.records:ImagePathError",
    "internvl.data.registry:MetaFileError",
    "internvl.data.encode:EncodeError",
    "internvl.data.images:ImageLoadError",
    "internvl.data.prompts:PromptError",
    "internvl.data.convert:ConvertError",
    "internvl.data.convert.masks:LabelMapError",
    "internvl.tokenization:TokenizerError",
    "internvl.inference:ModelLoadError",
    "internvl.model.loading:CheckpointError",
    "internvl.train.safe_load:UnsafeCheckpointError",
    "internvl.model.hf_conversion:ConversionError",
    "internvl.templates:TemplateError",
    "internvl.demo.batch:BatchError",
    "internvl.demo.uploads:UserInputError",
    "medrega_eval.benchmarks:BenchmarkError",
    "medrega_eval.benchmarks:MissingData",
    "medrega_eval.run:ResumeMismatchError",
    "medrega_eval.io:ScoreInputError",
)

_OS_EXPECTED: tuple[type[BaseException], ...] = (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                                                  PermissionError, FileExistsError)


def expected_error_types() -> tuple[type[BaseException], ...]:
    """The expected error types whose modules are loaded now (plus the missing/unreadable-file OS errors)."""
    found: list[type[BaseException]] = list(_OS_EXPECTED)
    for spec in EXPECTED_ERRORS:
        module_name, _, name = spec.partition(":")
        module = sys.modules.get(module_name)
        cls = getattr(module, name, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, BaseException):
            found.append(cls)
    return tuple(found)


def one_line(exc: BaseException, limit: int = 2000) -> str:
    """The exception's message on one line (several problems joined by ``; ``), at most ``limit`` characters."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{str(exc.filename)[:300]}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    text = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_cli(prog: str, fn: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call ``fn(argv)``; an expected failure prints ``PROG: message`` and returns 2; other errors propagate."""
    try:
        return int(fn(argv) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except expected_error_types() as exc:  # noqa: B030 - a tuple computed at the time of the failure
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_EXPECTED
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a bug or an environment failure
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)  # name too long, a loop of links, ...
        return EXIT_EXPECTED


def _number(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value != value or not test(value) or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value

    return parse


#: argparse ``type=`` for counts that must be at least 1 (batch sizes, token budgets, beams, ports).
positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1")
#: argparse ``type=`` for counts that may be 0 (limits where 0 means "none", print caps).
non_negative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
#: argparse ``type=`` for TCP ports.
port_number = _number(int, lambda v: 1 <= v <= 65535, "a port number 1-65535")
#: argparse ``type=`` for finite numbers >= 0 (temperatures, where 0 means greedy).
non_negative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The model-loading and decoding options of the demo and ``medrega-eval run`` (read back by
    ``internvl.inference.GenerationSettings.from_args`` and ``load_model_and_tokenizer``)."""
    parser.add_argument("--dtype", default=None,
                        help=f"weights dtype: bfloat16 | float16 | float32 | auto (default: {DTYPE_RULE})")
    parser.add_argument("--device-map", default=None, help="'auto' shards a large model over the visible GPUs")
    quantization = parser.add_mutually_exclusive_group()
    quantization.add_argument("--load-in-8bit", action="store_true", help="8-bit LLM weights (bitsandbytes, GPU)")
    quantization.add_argument("--load-in-4bit", action="store_true", help="4-bit LLM weights (bitsandbytes, GPU)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=400)
    parser.add_argument("--num-beams", type=positive_int, default=1)
    parser.add_argument("--temperature", type=non_negative_float, default=0.0,
                        help="0 = greedy (default, as the original demo and evaluation)")
