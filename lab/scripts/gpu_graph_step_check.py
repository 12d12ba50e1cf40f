"""GPU check of the CUDA-graph training step (`lab.graph_step.CudaGraphTrainStep`).

From the same random bf16 weights and batches (the benchmark's `mid` preset, 8 x 1024-token one-image samples) it
runs `--steps` optimizer steps of the plain loop (the trainer's fast paths and fused loss, AdamW) and of the graph
step, and prints both loss curves and their largest relative difference. Then it runs the graph step's body once
more, eagerly, under `torch.cuda.set_sync_debug_mode("warn")` and lists the host syncs it hits. That list is for
information: an eager run takes transformers' packing check (`find_packed_sequence_indices` reads one value back),
which it skips while a CUDA graph is being captured; a sync inside the capture would have failed the capture.
Exits 1 when the curves differ by more than --rtol or the step never captured and replayed a graph.

`--packed`: two packed batches instead (the data pipeline's `PackedCollator`, rows of up to --seq tokens, samples of
varied lengths, position ids restarting per sample), cycled: each signature is captured on its third sighting, and
attention runs under transformers' block-diagonal mask.

    python -m lab.scripts.gpu_graph_step_check --steps 8 [--ckpt] [--packed]     # from the repository root
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings

import torch

from internvl.model import load_preset
from lab.bench import batches as B
from lab.bench.build import build_ours
from lab.bench.lengths import SampleLength
from lab.bench.train_bench import graph_step_batch, ours_loss, set_checkpointing, set_fast
from lab.bench.train_profile import bench_optimizer
from lab.graph_step import CudaGraphTrainStep


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mid")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ckpt", action="store_true", help="gradient checkpointing on")
    p.add_argument("--packed", action="store_true", help="two packed batches, cycled (see above)")
    p.add_argument("--rtol", type=float, default=2e-3)
    args = p.parse_args(argv)

    config = load_preset(args.preset)
    img_id = config.llm_config.vocab_size - 1
    if args.packed:
        gen = torch.Generator().manual_seed(0)
        samples = [SampleLength("mixed", 24 + B.IMAGE_TOKENS + 30, int(torch.randint(5, 700, (1,), generator=gen)))
                   for _ in range(4 * args.batch)]
        packed = B.packed_batches(samples, 4, args.seq, vocab=config.llm_config.vocab_size, image_token_id=img_id,
                                  num_image_token=config.num_image_token, image_size=config.force_image_size)
        data = [b.to("cuda", torch.bfloat16) for b in packed[:2]]
        print("packed batches:", [tuple(b.input_ids.shape) for b in data], [len(b.doc_lengths) for b in data])
    else:
        data = [B.fixed_batch(args.batch, args.seq, vocab=config.llm_config.vocab_size, image_token_id=img_id,
                              num_image_token=config.num_image_token, image_size=config.force_image_size,
                              answer_from=24 + B.IMAGE_TOKENS + 30, seed=i).to("cuda", torch.bfloat16)
                for i in range(4)]

    def build():
        model = build_ours(config, device="cuda", dtype=torch.bfloat16, seed=0)
        model.img_context_token_id = img_id
        set_checkpointing(model, args.ckpt)
        set_fast(model, True)
        model.train()
        return model

    curves: dict[str, list[float]] = {}
    model = build()
    opt = bench_optimizer(model)
    curves["plain"] = []
    for i in range(args.steps):
        loss = ours_loss(model, data[i % len(data)], fast=True)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        curves["plain"].append(float(loss.detach()))
    del model, opt
    torch.cuda.empty_cache()

    model = build()
    opt = bench_optimizer(model, capturable=True)
    step = CudaGraphTrainStep(model, opt)
    curves["graph"] = [float(step(graph_step_batch(data[i % len(data)]))) for i in range(args.steps)]
    rel = max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(curves["plain"], curves["graph"]))

    syncs: list[str] = []
    plan = step.plan(graph_step_batch(data[0]))
    opt.zero_grad(set_to_none=True)

    def record(message, category, filename, lineno, file=None, line=None):
        if "prototype feature" in str(message):
            return
        syncs.append(f"{message} at\n{''.join(traceback.format_stack(limit=12)[:-1])}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step._body(graph_step_batch(data[0]), plan)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    report = {"curves": curves, "max_rel_diff": rel, "steps": step.steps, "syncs_in_body": len(syncs),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "ckpt": args.ckpt, "packed": args.packed}
    print(json.dumps(report, indent=1))
    for s in syncs[:10]:
        print("SYNC:", s)
    ok = rel <= args.rtol and step.steps["captured"] == len({step.plan(graph_step_batch(b)).key for b in data[:args.steps]}) \
        and step.steps["replayed"] > 0
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
