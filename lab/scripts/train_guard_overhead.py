#!/usr/bin/env python3
"""Cost of the divergence guard and the checkpoint manifests: the same `medrega-train` run with and without them, in
one process, alternating, reporting optimizer steps per second (median of the repeats) and the ratio.

"Without" switches off the per-step finiteness check (`MedRegTrainer._get_grad_norm` back to Trainer's), the
finite-model check before each save and the per-rank hashing + merge of each checkpoint's manifest. Everything else
(data, model, saving itself) is the same.

    python -m lab.scripts.gpu_check_prep /tmp/gc 64          # tokenizer in /tmp/gc/tok, meta file printed
    python -m lab.scripts.train_guard_overhead --tokenizer /tmp/gc/tok --meta /tmp/gc/data/meta.json --out /tmp/ovh \\
        --steps 40 --save_steps 5 --repeats 3 -- --use_cpu True --force_image_size 56
Flags after `--` go to medrega-train (e.g. `--preset mid --bf16 True` on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

from transformers import Trainer

from internvl.train import guards
from internvl.train import trainer as trainer_module
from internvl.train.arguments import parse_args
from internvl.train.cli import train


@contextlib.contextmanager
def unguarded() -> Iterator[None]:
    """The trainer without the finiteness checks and without checkpoint manifests."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(trainer_module.MedRegTrainer, "_get_grad_norm", Trainer._get_grad_norm))
        stack.enter_context(mock.patch.object(trainer_module, "assert_finite_model", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(guards, "assert_finite_model", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(trainer_module, "write_rank_manifest", lambda *a, **k: None))
        stack.enter_context(mock.patch.object(trainer_module, "merge_manifests", lambda *a, **k: None))
        yield


@contextlib.contextmanager
def timed(seconds: dict[str, float]) -> Iterator[None]:
    """Accumulate the wall time spent in the guard's and the manifest's functions, and in whole checkpoint saves."""
    def wrap(owner: object, name: str) -> mock._patch:
        inner = getattr(owner, name)

        def timer(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return mock.patch.object(owner, name, timer)

    with contextlib.ExitStack() as stack:
        for owner, name in ((trainer_module, "write_rank_manifest"), (trainer_module, "merge_manifests"),
                            (trainer_module, "assert_finite_model"), (guards.StepGuard, "check_step"),
                            (trainer_module.MedRegTrainer, "_save_checkpoint")):
            stack.enter_context(wrap(owner, name))
        yield


def one_run(argv: list[str], out: Path, guarded: bool, seconds: dict[str, float]) -> float:
    """Optimizer steps per second of one run (Trainer's train_steps_per_second, saves included)."""
    shutil.rmtree(out, ignore_errors=True)
    model_args, data_args, training_args = parse_args([*argv, "--output_dir", str(out)])
    with timed(seconds) if guarded else unguarded():
        metrics = train(model_args, data_args, training_args)
    shutil.rmtree(out, ignore_errors=True)
    return float(metrics["train_steps_per_second"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--meta", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--save_steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more medrega-train flags (after --)")
    args = parser.parse_args()
    argv = ["--preset", args.preset, "--tokenizer_path", args.tokenizer, "--meta_path", args.meta,
            "--max_steps", str(args.steps), "--save_strategy", "steps", "--save_steps", str(args.save_steps),
            "--per_device_train_batch_size", "2", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--report_to", "none", "--disable_tqdm", "True", "--grad_checkpoint", "False", "--seed", "0", *args.extra]
    if args.save_steps <= 0:
        argv[argv.index("--save_strategy") + 1] = "no"
    rates: dict[bool, list[float]] = {True: [], False: []}
    seconds: dict[str, float] = {}
    for i in range(args.repeats):
        for guarded in (False, True):
            rate = one_run(argv, args.out / f"{'on' if guarded else 'off'}{i}", guarded, seconds)
            rates[guarded].append(rate)
            print(f"repeat {i} guard+manifest {'on ' if guarded else 'off'}: {rate:.3f} steps/s", flush=True)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"median steps/s: off {off:.3f}, on {on:.3f}; on/off = {on / off:.3f} "
          f"({args.steps} steps, a checkpoint every {args.save_steps})")
    runs = args.repeats
    print("seconds per guarded run: " + ", ".join(f"{k} {v / runs:.4f}" for k, v in sorted(seconds.items())))


if __name__ == "__main__":
    main()
