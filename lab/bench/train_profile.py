"""Where the time of a full training step goes: a torch.profiler trace of warm optimizer steps (forward, backward,
`opt.step()`, `zero_grad`) reduced to wall time, GPU busy time and a split of the busy time by kernel kind.

Why a new reduction instead of `key_averages()`: summing "self CUDA" over the averaged table double counts (the
device rows of compiled regions / annotations span the kernels they contain) and says nothing about the time the GPU
sits idle. Here only real device work counts (kernels, memcpy, memset, see `is_device_kernel`), and

    busy  = length of the union of the kernel intervals inside the step's window
    idle  = wall - busy   (split into lead-in before the first kernel, gaps between kernels, tail after the last)

Each step runs inside a `record_function` marker that ends with a device synchronize, so the marker's CPU range
[start, end] contains every kernel the step launched and its length is the step's wall time (the synchronize adds
one launch lead-in per step that the timed, unsynchronized loop hides; compare with the timed ms/step).

Busy time is split by `CATEGORY_RULES` (first matching rule wins); where kernels overlap (several streams) each
instant is shared equally among the kernels running then, so the split adds up to `busy` exactly. `overlap_ms` is
the summed kernel time minus `busy` (zero on one stream).
"""
from __future__ import annotations

import fnmatch
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

#: kernel category -> glob patterns, matched case-insensitively against the full (demangled) kernel name; the first
#: rule with a matching pattern wins, so attention (whose kernels may mention cutlass/gemm) comes before GEMM.
CATEGORY_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("*flash*", "*fmha*", "*sdpa*", "*cudnn*attention*", "flex*", "*flex_attention*")),
    ("gemm", ("nvjet*", "*gemm*", "*gemv*", "*sm90_xmma*", "*cutlass*", "*cublas*", "triton_tem_fused_*mm*")),
    ("optimizer", ("*fusedadam*", "*fused_adam*", "*multi_tensor*")),
    ("triton", ("triton_*",)),
    ("memcpy", ("memcpy*", "memset*")),
)
#: every category a breakdown reports, in print order ("other" = no rule matched)
CATEGORIES: tuple[str, ...] = tuple(name for name, _ in CATEGORY_RULES) + ("other",)
#: kineto activity types that are real device work (not runtime calls, not annotations of ranges)
KERNEL_ACTIVITIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})
#: idle gaps between kernels are summed into these buckets (upper bounds in microseconds; the last is open)
GAP_BUCKETS_US: tuple[tuple[str, float], ...] = (("<10us", 10.0), ("10-100us", 100.0), (">=100us", float("inf")))
STEP_MARKER = "internvl.profile_full_step"


def kernel_category(name: str) -> str:
    """Category of a device kernel (or memcpy/memset) by its name: the first `CATEGORY_RULES` entry that matches,
    else "other"."""
    low = name.lower()
    for category, patterns in CATEGORY_RULES:
        if any(fnmatch.fnmatchcase(low, p) for p in patterns):
            return category
    return "other"


@dataclass(frozen=True)
class Span:
    """One piece of device work on the profiler's time axis (microseconds from the trace start)."""

    name: str
    start_us: float
    end_us: float

    def __post_init__(self) -> None:
        if self.end_us < self.start_us:
            raise ValueError(f"span {self.name!r} ends before it starts: {self.start_us} > {self.end_us}")


def is_device_kernel(event: Any) -> bool:
    """True for a profiler event that is real device work: a kernel, memcpy or memset (kineto activity types
    "kernel", "gpu_memcpy", "gpu_memset"). CPU ops, runtime calls and range annotations - including the device-side
    rows of "Torch-Compiled Region" and `record_function` markers, which span the kernels inside them - are not.
    Events without `activity_type` (older torch) fall back to: not on the CPU and not a user annotation."""
    activity = getattr(event, "activity_type", None)
    if activity:
        return str(activity) in KERNEL_ACTIVITIES
    if getattr(event, "is_user_annotation", False):
        return False
    return not str(getattr(event, "device_type", "CPU")).endswith("CPU")


def device_spans(events: Iterable[Any]) -> list[Span]:
    """The device kernels of a profiler event list (`prof.events()`) as spans, sorted by start."""
    spans = [Span(e.name, float(e.time_range.start), float(e.time_range.end)) for e in events if is_device_kernel(e)]
    return sorted(spans, key=lambda s: (s.start_us, s.end_us))


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals (overlapping and nested intervals count once)."""
    total = 0.0
    cur_start = cur_end = None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _in_window(s: Span, start_us: float, end_us: float) -> bool:
    """A span overlaps the window by a positive length, or is an instant inside it."""
    if s.start_us == s.end_us:
        return start_us <= s.start_us <= end_us
    return s.end_us > start_us and s.start_us < end_us


def window_breakdown(spans: Sequence[Span], start_us: float, end_us: float) -> dict:
    """Busy/idle breakdown of the window [start_us, end_us] (spans are clipped to it; the ones outside ignored).

    Returns milliseconds: wall, busy (union of spans), idle = wall - busy, with idle split into lead (before the
    first kernel), gaps (between kernels, also by size in `gap_buckets_ms`) and tail (after the last kernel);
    `categories_ms` (busy split by `kernel_category`, sums to busy), `kernel_sum_ms` (summed span lengths),
    `overlap_ms` = kernel_sum - busy, and the number of kernels.
    """
    if end_us < start_us:
        raise ValueError(f"window ends before it starts: {start_us} > {end_us}")
    clipped = [(max(s.start_us, start_us), min(s.end_us, end_us), kernel_category(s.name)) for s in spans
               if _in_window(s, start_us, end_us)]
    cats = dict.fromkeys(CATEGORIES, 0.0)
    buckets = {name: 0.0 for name, _ in GAP_BUCKETS_US}
    wall = end_us - start_us
    if not clipped:
        return {"wall_ms": wall / 1e3, "busy_ms": 0.0, "idle_ms": wall / 1e3, "idle_frac": 1.0 if wall else 0.0,
                "lead_ms": wall / 1e3, "gaps_ms": 0.0, "tail_ms": 0.0, "gap_buckets_ms": buckets,
                "categories_ms": cats, "kernel_sum_ms": 0.0, "overlap_ms": 0.0, "kernels": 0}
    # sweep over the boundaries: between two consecutive boundaries the active set is constant
    points: list[tuple[float, int, str]] = []
    for s, e, c in clipped:
        points.append((s, 1, c))
        points.append((e, -1, c))
    points.sort(key=lambda p: (p[0], p[1]))
    active: dict[str, int] = {}
    n_active = 0
    busy = gaps = 0.0
    prev = points[0][0]
    for t, delta, c in points:
        seg = t - prev
        if seg > 0:
            if n_active:
                busy += seg
                for cat, n in active.items():
                    cats[cat] += seg * n / n_active
            else:  # inside [first start, last end]: an idle gap between kernels
                gaps += seg
                for name, upper in GAP_BUCKETS_US:
                    if seg < upper:
                        buckets[name] += seg / 1e3
                        break
        active[c] = active.get(c, 0) + delta
        if not active[c]:
            del active[c]
        n_active += delta
        prev = t
    first = min(s for s, _, _ in clipped)
    last = max(e for _, e, _ in clipped)
    kernel_sum = sum(e - s for s, e, _ in clipped)
    return {"wall_ms": wall / 1e3, "busy_ms": busy / 1e3, "idle_ms": (wall - busy) / 1e3,
            "idle_frac": (wall - busy) / wall if wall else 0.0, "lead_ms": (first - start_us) / 1e3,
            "gaps_ms": gaps / 1e3, "tail_ms": (end_us - last) / 1e3, "gap_buckets_ms": buckets,
            "categories_ms": {k: v / 1e3 for k, v in cats.items()}, "kernel_sum_ms": kernel_sum / 1e3,
            "overlap_ms": (kernel_sum - busy) / 1e3, "kernels": len(clipped)}


def top_kernels(spans: Iterable[Span], n: int = 25, *, steps: int = 1, name_chars: int = 200) -> list[dict]:
    """The `n` kernels with the most total time: name (cut to `name_chars`), category, calls per step, total and
    per-step milliseconds, mean microseconds per call."""
    agg: dict[str, list[float]] = {}
    for s in spans:
        a = agg.setdefault(s.name, [0, 0.0])
        a[0] += 1
        a[1] += s.end_us - s.start_us
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": name[:name_chars], "category": kernel_category(name), "calls": int(calls),
             "calls_per_step": calls / steps, "total_ms": total / 1e3, "ms_per_step": total / 1e3 / steps,
             "mean_us": total / calls} for name, (calls, total) in rows]


def _mean_breakdown(rows: list[dict]) -> dict:
    """Mean over steps of every number in the per-step breakdowns (nested dicts averaged key by key)."""
    def avg(values: list):
        if isinstance(values[0], dict):
            return {k: avg([v[k] for v in values]) for k in values[0]}
        return None if values[0] is None else sum(values) / len(values)
    return {k: avg([r[k] for r in rows]) for k in rows[0]}


def reduce_trace(events: Sequence[Any], steps: int, *, top: int = 25) -> tuple[list[dict], list[dict], bool]:
    """(per-step breakdowns, top kernels, whether the trace has device kernels) of a profiler event list holding
    `steps` CPU ranges named f"{STEP_MARKER}#i". Without device kernels a step's busy/idle/split are None."""
    markers = sorted((e for e in events if e.name.startswith(STEP_MARKER + "#") and not is_device_kernel(e)
                      and str(getattr(e, "device_type", "CPU")).endswith("CPU")),
                     key=lambda e: e.time_range.start)
    if len(markers) != steps:
        raise RuntimeError(f"profile_full_step: found {len(markers)} step markers in the trace, expected {steps}")
    windows = [(float(m.time_range.start), float(m.time_range.end)) for m in markers]
    spans = device_spans(events)
    if not spans:
        return ([{"wall_ms": (end - start) / 1e3, "busy_ms": None, "idle_ms": None, "idle_frac": None,
                  "categories_ms": None, "kernels": 0} for start, end in windows], [], False)
    in_steps = [s for s in spans if any(_in_window(s, start, end) for start, end in windows)]
    return ([window_breakdown(spans, start, end) for start, end in windows],
            top_kernels(in_steps, top, steps=steps), True)


def profile_full_step(model: torch.nn.Module, loss_fn: Callable, batches: Sequence, opt: torch.optim.Optimizer,
                      path: str | Path, *, steps: int = 3, warmup: int = 1, top: int = 25,
                      cpu_rows: int = 20, step_fn: Callable[[int], torch.Tensor] | None = None) -> dict:
    """Profile `steps` full optimizer steps (`loss_fn(model, batch)`, backward, `opt.step()`,
    `opt.zero_grad(set_to_none=True)`) after `warmup` unprofiled ones (which allocate the optimizer state and pay any
    compile), cycling over `batches`. Writes a readable report to `path` and returns a JSON-able dict:

    {"steps", "device_events": bool, "per_step": [breakdown...], "mean": breakdown, "top_kernels": [...],
     "cpu_self_ms_per_step", "loss_last"}. A breakdown has wall_ms, busy_ms, idle_ms, idle_frac, lead/gaps/tail_ms,
    gap_buckets_ms, categories_ms, kernel_sum_ms, overlap_ms, kernels (see `window_breakdown`). Without device
    kernels in the trace (a CPU run) busy/idle and the split are None and only the wall time and the CPU op table
    are reported. `step_fn(i)`, when given, is the whole optimizer step on batch i instead (a `CudaGraphTrainStep`
    call: `loss_fn` and `opt` are then unused).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not batches:
        raise ValueError("profile_full_step needs at least one batch")
    first = next(model.parameters())
    cuda = first.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step(i: int) -> torch.Tensor:
        if step_fn is not None:
            return step_fn(i)
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    model.train()
    for i in range(warmup):
        step(i)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    losses = []
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            with record_function(f"{STEP_MARKER}#{i}"):
                losses.append(step(warmup + i))
                sync()
        host_seconds = time.perf_counter() - t0
    result = {**trace_result(prof, steps, host_seconds, first.device, path, top=top, cpu_rows=cpu_rows),
              "loss_last": float(losses[-1])}
    return result


def trace_result(prof: Any, steps: int, host_seconds: float, device: torch.device | str, path: str | Path, *,
                 top: int = 25, cpu_rows: int = 20) -> dict:
    """The result dict of `profile_full_step` (without the loss) from a finished profiler holding `steps` ranges
    f"{STEP_MARKER}#i"; the readable report (`report_text` + the CPU op table) is written to `path`."""
    per_step, top_rows, has_device = reduce_trace(prof.events(), steps, top=top)
    averages = prof.key_averages()
    # host time spent in ops and runtime calls (all threads), without the step markers and the waits of synchronize
    cpu_self_us = sum(e.self_cpu_time_total for e in averages
                      if not e.key.startswith(STEP_MARKER) and "synchronize" not in e.key.lower()
                      and str(getattr(e, "device_type", "CPU")).endswith("CPU"))
    result = {
        "steps": steps,
        "device": str(device),
        "device_events": has_device,
        "host_ms_per_step": host_seconds / steps * 1e3,
        "per_step": per_step,
        "mean": _mean_breakdown(per_step),
        "top_kernels": top_rows,
        "cpu_self_ms_per_step": cpu_self_us / 1e3 / steps,
    }
    cpu_table = averages.table(sort_by="self_cpu_time_total", row_limit=cpu_rows, max_name_column_width=60)
    Path(path).write_text(report_text(result) + "\n\n== CPU ops (self CPU time, all profiled steps) ==\n" + cpu_table)
    return result


def bench_optimizer(model: torch.nn.Module, *, capturable: bool = False) -> torch.optim.Optimizer:
    """The benchmark's optimizer: AdamW (lr 1e-5, no weight decay) over the trainable parameters, fused on CUDA;
    `capturable` (CUDA only) for steps replayed as a CUDA graph."""
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = params[0].is_cuda
    return torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda, capturable=capturable and cuda)


def profile_case(model: torch.nn.Module, loss_fn: Callable, batches: Sequence, path: str | Path, *,
                 steps: int = 3, warmup: int = 1) -> dict:
    """`profile_full_step` with a fresh `bench_optimizer`; the optimizer and the gradients are dropped afterwards."""
    opt = bench_optimizer(model)
    try:
        return profile_full_step(model, loss_fn, batches, opt, path, steps=steps, warmup=warmup)
    finally:
        del opt
        model.zero_grad(set_to_none=True)


def summary_line(name: str, p: dict, timed_ms: float | None = None) -> str:
    """One printed line per profiled case: wall (and the timed ms/step), busy, idle %, split of busy in ms."""
    m = p["mean"]
    timed = f" (timed {timed_ms:.1f})" if timed_ms is not None else ""
    head = f"full step {name}: wall {m['wall_ms']:.1f} ms{timed}"
    if not p.get("device_events"):
        return f"{head}, no device kernels in the trace, self CPU {p['cpu_self_ms_per_step']:.1f} ms"
    cats = " ".join(f"{k} {v:.1f}" for k, v in m["categories_ms"].items())
    return (f"{head}, busy {m['busy_ms']:.1f} ms, idle {m['idle_frac'] * 100:.1f}% (lead {m['lead_ms']:.1f}, gaps "
            f"{m['gaps_ms']:.1f}, tail {m['tail_ms']:.1f}) | ms: {cats}")


def report_text(p: dict) -> str:
    """The readable report of `profile_full_step`: the per-step table, the mean split and the top kernels."""
    lines = [(f"full training step profile: {p['steps']} steps on {p['device']}, host {p['host_ms_per_step']:.1f} ms "
              f"per step (profiler on), self CPU of ops {p['cpu_self_ms_per_step']:.1f} ms per step")]
    if not p["device_events"]:
        lines.append("no device kernels in the trace (CPU run): busy / idle not available")
        lines += [f"step {i}: wall {r['wall_ms']:.2f} ms" for i, r in enumerate(p["per_step"])]
        return "\n".join(lines)
    head = f"{'step':>5s} {'wall':>9s} {'busy':>9s} {'idle':>9s} {'idle%':>6s} {'lead':>7s} {'gaps':>8s} {'tail':>7s}"
    head += "".join(f" {c:>9s}" for c in CATEGORIES) + f" {'overlap':>8s} {'kernels':>8s}"
    lines += ["", "milliseconds per step (busy = union of kernel intervals; the split adds up to busy)", head]
    for label, r in [(str(i), r) for i, r in enumerate(p["per_step"])] + [("mean", p["mean"])]:
        lines.append(f"{label:>5s} {r['wall_ms']:9.2f} {r['busy_ms']:9.2f} {r['idle_ms']:9.2f} "
                     f"{r['idle_frac'] * 100:5.1f}% {r['lead_ms']:7.2f} {r['gaps_ms']:8.2f} {r['tail_ms']:7.2f}"
                     + "".join(f" {r['categories_ms'][c]:9.2f}" for c in CATEGORIES)
                     + f" {r['overlap_ms']:8.2f} {r['kernels']:8.0f}")
    m = p["mean"]
    lines.append("idle gaps between kernels by gap size (ms per step): "
                 + ", ".join(f"{k} {v:.2f}" for k, v in m["gap_buckets_ms"].items()))
    lines.append("share of busy: " + ", ".join(
        f"{c} {m['categories_ms'][c] / m['busy_ms'] * 100:.1f}%" for c in CATEGORIES if m["busy_ms"]))
    lines += ["", f"top {len(p['top_kernels'])} kernels by total time (per step)",
              f"{'ms/step':>8s} {'calls':>7s} {'mean us':>9s} {'category':>9s}  name"]
    for k in p["top_kernels"]:
        lines.append(f"{k['ms_per_step']:8.2f} {k['calls_per_step']:7.1f} {k['mean_us']:9.1f} {k['category']:>9s}  "
                     f"{k['name'][:120]}")
    lines += ["", "json: " + json.dumps({k: p[k] for k in ("steps", "mean", "host_ms_per_step")})]
    return "\n".join(lines)
