#!/usr/bin/env python3
"""Summarise medrega-train runs from their trainer_state.json files: tokens/s and samples/s (median over logged steps
after the first `--skip`), peak GPU memory, first/last loss; with `--reference`, the largest per-step loss difference
to that run (for "same global batch, different GPU count" comparisons). With `--max-diff X` it exits 1 when a run's
logged steps differ from the reference's or a per-step loss differs by more than X (so scripts can assert).

    python -m lab.scripts.summarize_train_logs runs/a/trainer_state.json runs/b/trainer_state.json --reference runs/a/...
"""
import argparse
import json
import statistics
import sys
from pathlib import Path


def losses(path: Path) -> list[dict]:
    return [e for e in json.loads(path.read_text())["log_history"] if "loss" in e]


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("states", nargs="+", type=Path)
parser.add_argument("--reference", type=Path, default=None)
parser.add_argument("--skip", type=int, default=2)
parser.add_argument("--names", nargs="*", default=None)
parser.add_argument("--max-diff", type=float, default=None,
                    help="exit 1 if a per-step loss differs from the reference by more than this, or steps differ")
args = parser.parse_args()
failed = []
ref = {e["step"]: e["loss"] for e in losses(args.reference)} if args.reference else None
print("| run | tokens/s (median) | samples/s | peak GPU mem GiB | first / last loss | max abs loss diff vs reference |")
print("|---|---|---|---|---|---|")
for i, path in enumerate(args.states):
    logs = losses(path)
    tail = logs[args.skip:] or logs
    tps = statistics.median(e.get("tokens_per_second", 0) for e in tail)
    sps = statistics.median(e.get("samples_per_second", 0) for e in tail)
    mem = max(e.get("gpu_mem_peak_gib", 0) for e in logs)
    diff = "-"
    if ref is not None:
        common = [e for e in logs if e["step"] in ref]
        worst = max((abs(e["loss"] - ref[e["step"]]) for e in common), default=float("inf"))
        diff = f"{worst:.4f} over {len(common)} steps"
        if args.max_diff is not None and (worst > args.max_diff or {e["step"] for e in logs} != set(ref)):
            failed.append(f"{path}: max per-step loss difference {worst:.4g} (limit {args.max_diff}), "
                          f"steps {len(common)} of {len(ref)} in common")
    default = path.parent.name if path.name == "trainer_state.json" else path.stem.removesuffix("_state")
    name = args.names[i] if args.names else default
    print(f"| {name} | {tps:.0f} | {sps:.2f} | {mem:.2f} | {logs[0]['loss']:.3f} / {logs[-1]['loss']:.3f} | {diff} |")
for line in failed:
    print(f"MISMATCH {line}", file=sys.stderr)
sys.exit(1 if failed else 0)
