"""Plumbing shared by the benchmark sections: a case guard that records failures instead of stopping the run, a
wall-clock deadline (a device run has a hard time limit), and releasing device memory between cases."""
from __future__ import annotations

import gc
import logging
import time
import traceback

import torch
import torch._dynamo as dynamo

logger = logging.getLogger("lab.bench")


def guard(results: dict, key: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)`, or None after recording the failure under results["errors"] (case name `key`; with
    key "_tmp" the case name is `args[0]` when that is a string)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a benchmark case failing must not stop the others
        if key == "_tmp" and args and isinstance(args[0], str):
            key = args[0]
        logger.error("%s failed: %s", key, exc)
        results.setdefault("errors", []).append({"case": key, "error": repr(exc), "trace": traceback.format_exc()})
        return None


class Deadline:
    """Wall-clock budget of a benchmark section: cases that would start after it are skipped and recorded."""

    def __init__(self, seconds: float | None) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


def free(*, reset_compiled: bool = False) -> None:
    """Collect garbage and return cached device memory, so the next case's peak starts clean. `reset_compiled` also
    clears dynamo's compiled-code caches, whose guards and closures (and CUDA graphs) keep a finished model alive."""
    if reset_compiled:
        dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cuda_milliseconds(fn, n: int = 20, warmup: int = 3) -> float:
    """Mean CUDA time in milliseconds of `fn()` over `n` calls after `warmup` calls (CUDA events; warm caches)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(n):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n
