"""`python -m lab.bench`: one run, one table (absolute figures + ratios), one JSON.

Sections (pick with --sections): `train` (ours vs native, checkpointing off/on), `pack` (packing vs padding on the
IU length mix), `gen` (batch 1/8/32 greedy, ours vs native default and native static+compiled), `real` (the 40B
MedRegA shape through batch_chat), `profile` (torch.profiler top kernels of one step of each kind), `kernels` (our
batch-1 decode kernels against cuBLAS / cuDNN / inductor on the decoder's shapes, lab/bench/kernel_bench.py).
Every case runs inside try/except: a failure is recorded in the JSON and the table, the run goes on.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import CompileConfig

from internvl.model import DecodeConfig, load_preset
from internvl.model.fast_generate import decoder_for

from . import batches as B
from .build import build_native, build_ours
from .flops import H100_H200_BF16_PEAK, decode_weight_bytes, shape_of
from .gen_bench import (
    RealLLM,
    agreement,
    apply_variant,
    parse_variants,
    profile_replays,
    real_llm_variants,
    run_gen_case,
    ttft_compare,
    ttft_lines,
    variant_lines,
)
from .kernel_bench import kernel_lines, section_kernels
from .lengths import describe, iu_report_token_lengths, sample_mix
from .real_shape import run_real_shape
from .recipe import ENGINES, recipe_table_lines, run_recipe
from .runtime import Deadline, free
from .runtime import guard as _guard
from .train_bench import ours_loss, run_train_case, set_fast, train_table_lines
from .train_bench import section_train as run_train_section

log = logging.getLogger("lab.bench")
IMG_ID_OFFSET = 1  # the image-context id used in synthetic batches: vocab_size - 1


def device_ceilings() -> dict:
    """Measured bf16 matmul rate and device-to-device copy bandwidth (read + write bytes)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    mm = 10 * 2 * 8192**3 / (time.perf_counter() - t0)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() / (time.perf_counter() - t0)
    del a, b, x, y
    torch.cuda.empty_cache()
    return {"matmul_bf16_flops": mm, "copy_bytes_per_s": bw, "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__}


def section_train(args, res: dict, config) -> None:
    """Native vs our trainer's fast paths (variants side by side), checkpointing off/on: `train_bench.section_train`."""
    def batches_for(vocab: int, img_id: int) -> list:
        return [B.fixed_batch(args.batch, args.seq, vocab=vocab, image_token_id=img_id,
                              num_image_token=config.num_image_token, image_size=config.force_image_size,
                              answer_from=24 + B.IMAGE_TOKENS + 30, seed=i).to(args.device, args.dtype)
                for i in range(2)]

    run_train_section(args, res, config, batches_for=batches_for)


def section_pack(args, res: dict, config) -> None:
    vocab = config.llm_config.vocab_size
    img_id = vocab - IMG_ID_OFFSET
    lengths = iu_report_token_lengths(args.reports)
    samples = sample_mix(args.pack_samples, lengths, seed=1, max_len=args.row_len)
    res["length_mix"] = {"iu_report_tokens": describe(lengths), "sample_tokens": describe([s.total for s in samples])}
    kw = dict(vocab=vocab, image_token_id=img_id, num_image_token=config.num_image_token,
              image_size=config.force_image_size)
    mega = args.pack_batch * 8  # LLaVA-style length grouping: sort inside mega-batches of 8 batches
    grouped = [s for i in range(0, len(samples), mega)
               for s in sorted(samples[i : i + mega], key=lambda x: -x.total)]
    cases = [
        ("padding, random order", B.padded_batches(samples, args.pack_batch, **kw)),
        ("padding, length-grouped", B.padded_batches(grouped, args.pack_batch, **kw)),
        (f"padding to max_length {args.row_len}", B.padded_batches(samples, args.pack_batch, pad_to=args.row_len, **kw)),
        (f"packing, rows of {args.row_len}", B.packed_batches(samples, args.pack_rows, args.row_len, **kw)),
    ]
    ours = build_ours(config, device=args.device, dtype=args.dtype, seed=0)
    ours.img_context_token_id = img_id
    set_fast(ours, True)
    shape = shape_of(ours)
    rows = res.setdefault("pack", [])
    fn = lambda m, b: ours_loss(m, b, fast=True)  # noqa: E731
    for name, data in cases:
        data = [b.to(args.device, args.dtype) for b in data]
        # warm-up: one untimed pass over every batch, so each distinct padded shape is compiled (and, for the
        # compiled layers, dynamic shapes settled) before timing - the steady state of a long training run
        r = _guard(res, "_tmp", run_train_case, name, ours, fn, data, shape=shape, steps=len(data),
                   warmup=len(data), ckpt=False, peak_flops=args.peak)
        if r:
            r["batches"] = len(data)
            r["slot_efficiency"] = sum(b.real_tokens for b in data) / sum(b.input_ids.numel() for b in data)
            rows.append(r)
    del ours
    free()


def section_recipe(args, res: dict) -> None:
    """The released recipe's shape through MedRegTrainer: no DeepSpeed, ZeRO-2/3 variants, FSDP2 (lab/bench/recipe)."""
    def save(rows: list[dict]) -> None:
        res["recipe"] = rows
        Path(args.out, "bench.json").write_text(json.dumps(res, indent=1, default=str))

    run_recipe([m for m in args.recipe_models.split(",") if m], engines=[e for e in args.recipe_engines.split(",") if e],
               loras=[int(r) for r in args.recipe_lora.split(",") if r], layers=args.recipe_layers,
               batch=args.recipe_batch, seq=args.recipe_seq, steps=args.recipe_steps, warmup=args.recipe_warmup,
               bf16=args.device == "cuda" if args.recipe_bf16 == "auto" else args.recipe_bf16 == "on",
               out=Path(args.out, "recipe_runs"), fused_adam=args.recipe_fused_adam,
               peak_flops=args.peak, lr=args.recipe_lr,
               distinct=args.recipe_distinct_batches, deadline_s=args.recipe_deadline_s, on_row=save,
               compile_backend=args.recipe_compile_backend, profile=args.recipe_profile)


def _save_partial(args, res: dict) -> None:
    """Write bench.json now (generated token tensors left out), so a run stopped at its time limit keeps what it has."""
    slim = {k: ([{kk: vv for kk, vv in r.items() if kk != "tokens"} for r in v] if k == "gen" else v)
            for k, v in res.items()}
    Path(args.out, "bench.json").write_text(json.dumps(slim, indent=1, default=str))


class _GenSection:
    """State of one `gen` section: our model and the native one with the same weights, the prompts per batch size,
    the result rows, and the deadline (cases that would start late are skipped and recorded)."""

    def __init__(self, args, res: dict, config) -> None:
        vocab = config.llm_config.vocab_size
        img_id = vocab - IMG_ID_OFFSET
        self.args, self.res = args, res
        self.deadline = Deadline(args.gen_deadline_s)
        self.skipped = res.setdefault("gen_skipped", [])
        self.ours = build_ours(config, device=args.device, dtype=args.dtype, seed=0).eval()
        self.ours.img_context_token_id = img_id
        self.ours.decode_config = DecodeConfig(backend=None if args.decode_backend == "none" else args.decode_backend)
        res["decode_weight_bytes"] = decode_weight_bytes(self.ours)
        self.native, self.copied = build_native(config, image_token_id=img_id, device=args.device, dtype=args.dtype,
                                                seed=0, copy_from=self.ours)
        self.native.eval()
        res["native_weights_copied"] = self.copied
        res["fast_is_default_generate"] = hasattr(self.ours, "fast_generate")
        self.rows = res.setdefault("gen", [])
        self.agree = res.setdefault("gen_agreement", [])
        self.prompts = {}
        for batch in args.gen_batches:
            ids, mask, pix = B.generation_prompts(batch, vocab=vocab, image_token_id=img_id,
                                                  num_image_token=config.num_image_token,
                                                  image_size=config.force_image_size)
            self.prompts[batch] = (ids.to(args.device), mask.to(args.device), pix.to(args.device, args.dtype))

    def due(self, label: str) -> bool:
        if self.deadline.over():
            self.skipped.append(f"{label} (at {self.deadline.elapsed():.0f} s)")
            return False
        return True

    def ours_fast_for(self, batch: int):
        """`generate(k)` of our default generation path on the prompts of `batch`."""
        ours, args = self.ours, self.args
        ids, mask, pix = self.prompts[batch]

        def ours_fast(k: int) -> torch.Tensor:
            if hasattr(ours, "fast_generate"):  # the model's default generate path
                kw = {} if args.device == "cuda" else {"fast_generate": "always"}
                return ours.generate(pixel_values=pix, input_ids=ids, attention_mask=mask, max_new_tokens=k,
                                     min_new_tokens=k, do_sample=False, eos_token_id=2, pad_token_id=0, **kw)
            with torch.inference_mode():
                emb = ours._embed(ids, pix, None)
                dec = decoder_for(ours.language_model, ours.decode_config)
                return dec.generate(emb, mask, max_new_tokens=k, eos_token_id=[2], min_new_tokens=k, pad_token_id=0)
        return ours_fast

    def variant_pass(self) -> dict:
        """Pass 1: our decode variants side by side, all batches, before anything else; returns the row per batch
        that stands for "ours fast" in the comparisons."""
        args, res = self.args, self.res
        fast_rows = {}
        cases = args.gen_cases or [(batch, name) for batch in args.gen_batches
                                   for name in (args.gen_variants if batch == 1 else args.gen_variants_batched)]
        real = None  # the 40B LLM, built at its first case ("real:<variant>")
        for batch, name in cases:
            if not self.due(f"ours [{name}] batch {batch}"):
                continue
            if batch == "real":
                if args.device != "cuda":
                    continue
                if real is None:
                    real = _guard(res, "gen_real_build", RealLLM, copy_bytes_per_s=res["device"]["copy_bytes_per_s"])
                if real is not None:
                    r = _guard(res, f"40B LLM [{name}]", real.run, name, args.gen_real_new_tokens)
                    if r:
                        res.setdefault("gen_real_variants", []).append(r)
                _save_partial(args, res)
                continue
            if real is not None:
                real = None
                free()
            apply_variant(self.ours, name)
            r = _guard(res, "_tmp", run_gen_case, f"ours [{name}]", self.ours_fast_for(batch), batch=batch,
                       new_tokens=args.new_tokens)
            if r:
                self.rows.append({**r, "variant": name})
                if name == args.gen_variants[0] or batch not in fast_rows:
                    fast_rows[batch] = r
                if batch == 1 and name == args.gen_profile_variant and args.device == "cuda":
                    res["profile_decode_variant"] = _guard(
                        res, "profile_decode_variant", profile_replays, self.ours_fast_for(1), args.new_tokens,
                        str(Path(args.out, "profile_decode_b1.txt")))
            _save_partial(args, res)
        real = None
        free()
        apply_variant(self.ours, args.gen_variants[-1])
        return fast_rows

    def _timed_case(self, label: str, generate, batch: int, fast: dict | None, vs: str | None, **kw) -> None:
        """Time one case, keep its row and, against `fast` (when given), how far the greedy tokens agree."""
        r = _guard(self.res, "_tmp", run_gen_case, label, generate, batch=batch, new_tokens=self.args.new_tokens,
                   **kw)
        if r:
            self.rows.append(r)
            if fast and vs:
                self.agree.append({"batch": batch, "vs": vs, **agreement(fast["tokens"], r["tokens"])})

    def compare_batch(self, batch: int, fast: dict | None) -> None:
        """Ours fast (unless the variant pass timed it), ours plain, native dynamic and native static at `batch`."""
        args, ours, native = self.args, self.ours, self.native
        ids, mask, pix = self.prompts[batch]
        length = ids.shape[1]
        plain_kw = {"fast_generate": False} if getattr(ours, "fast_generate", None) is not None else {}

        def ours_plain(k: int) -> torch.Tensor:
            return ours.generate(pixel_values=pix, input_ids=ids, attention_mask=mask, max_new_tokens=k,
                                 min_new_tokens=k, do_sample=False, eos_token_id=2, pad_token_id=0, **plain_kw)

        def native_gen(k: int, static: bool) -> torch.Tensor:
            extra = {}
            if static:
                extra = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=False)}
            out = native.generate(input_ids=ids, pixel_values=pix, attention_mask=mask, max_new_tokens=k,
                                  min_new_tokens=k, do_sample=False, eos_token_id=2, pad_token_id=0, **extra)
            return out[:, length:]

        if not args.gen_variants and self.due(f"ours fast batch {batch}"):
            fast = _guard(self.res, "_tmp", run_gen_case, "ours fast (static cache + CUDA graph)",
                          self.ours_fast_for(batch), batch=batch, new_tokens=args.new_tokens)
            if fast:
                self.rows.append(fast)
        if batch in args.plain_batches and self.due(f"ours plain batch {batch}"):
            self._timed_case("ours plain HF generate (dynamic cache)", ours_plain, batch, fast, "ours plain",
                             repeats=1, warm_tokens=4)
        copied = fast if self.copied else None
        if (args.native_batches is None or batch in args.native_batches) and self.due(f"native default batch {batch}"):
            self._timed_case("native default (dynamic cache)", lambda k: native_gen(k, False), batch, copied,
                             "native default", repeats=1, warm_tokens=4)
        if batch == 1 and self.due("TTFT batch 1"):
            self.res["ttft_b1"] = _guard(self.res, "ttft_b1", self.ttft_b1, lambda k: native_gen(k, False))
        if batch in args.static_batches and self.due(f"native static batch {batch}"):
            self._timed_case("native static + compiled", lambda k: native_gen(k, True), batch, copied,
                             "native static")
        _save_partial(args, self.res)

    def ttft_b1(self, native_gen) -> dict:
        """Batch-1 time to first token, ours (default generate) against native default, with our breakdown."""
        ours, (ids, mask, pix) = self.ours, self.prompts[1]
        with torch.inference_mode():
            emb = ours._embed(ids, pix, None)
        decoder = decoder_for(ours.language_model, ours.decode_config)
        padded = bool((mask == 0).any())

        def vision() -> torch.Tensor:
            with torch.inference_mode():
                return ours._embed(ids, pix, None, sync_free=True)

        def prefill() -> torch.Tensor:
            return decoder.generate(emb, mask, max_new_tokens=1, eos_token_id=[2], pad_token_id=0, padded=padded)

        return ttft_compare(self.ours_fast_for(1), native_gen, vision=vision, prefill=prefill)

    def variant_agreement(self) -> None:
        """How far the variants' greedy tokens agree at batch 1 (bf16 ties), against "baseline" or the first."""
        first = "baseline" if "baseline" in self.args.gen_variants else self.args.gen_variants[0]
        base = next((r for r in self.rows if r.get("variant") == first and r["batch"] == 1), None)
        for r in self.rows:
            if base is not None and r.get("variant") and r is not base and r["batch"] == 1:
                self.agree.append({"batch": 1, "vs": f"{base['variant']} vs {r['variant']}",
                                   **agreement(base["tokens"], r["tokens"])})


def section_gen(args, res: dict, config) -> None:
    """Our generation (default path and `--gen-variants`) against our plain `generate` and native's, per batch."""
    gen = _GenSection(args, res, config)
    fast_rows = gen.variant_pass() if args.gen_variants else {}
    if args.gen_real_variants and args.device == "cuda" and gen.due("40B LLM variants"):  # ~70 GiB beside the mids
        res.setdefault("gen_real_variants", []).extend(
            _guard(res, "gen_real_variants", real_llm_variants, args.gen_real_variants,
                   new_tokens=args.gen_real_new_tokens, copy_bytes_per_s=res["device"]["copy_bytes_per_s"]) or [])
        free()
        _save_partial(args, res)
    for batch in args.gen_batches:
        gen.compare_batch(batch, fast_rows.get(batch))
    if args.gen_variants and 1 in args.gen_batches:
        gen.variant_agreement()
    for r in gen.rows:
        r.pop("tokens", None)
    gen = None  # drop the models
    free()


def section_profile(args, res: dict, config) -> None:
    """Top CUDA kernels of one fast training step and one fast decode step (torch.profiler)."""
    vocab = config.llm_config.vocab_size
    img_id = vocab - IMG_ID_OFFSET
    ours = build_ours(config, device=args.device, dtype=args.dtype, seed=0)
    ours.img_context_token_id = img_id
    set_fast(ours, True)
    b = B.fixed_batch(args.batch, args.seq, vocab=vocab, image_token_id=img_id,
                      num_image_token=config.num_image_token, image_size=config.force_image_size,
                      answer_from=24 + B.IMAGE_TOKENS + 30).to(args.device, args.dtype)
    ours.train()
    for _ in range(2):
        ours_loss(ours, b, fast=True).backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours_loss(ours, b, fast=True).backward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    Path(args.out, "profile_train.txt").write_text(table)
    res["profile_train_top"] = table.splitlines()[:24]
    # decode: 32 replays of the captured step at batch 1 (kernels inside the graph are traced by CUPTI), with the
    # training fast paths removed first, as the trainer does at the end of training
    set_fast(ours, False)
    ours.eval()
    ours.decode_config = DecodeConfig(backend=None if args.decode_backend == "none" else args.decode_backend)
    ids, mask, pix = B.generation_prompts(1, vocab=vocab, image_token_id=img_id,
                                          num_image_token=config.num_image_token, image_size=config.force_image_size)
    ids, mask, pix = ids.to(args.device), mask.to(args.device), pix.to(args.device, args.dtype)
    with torch.inference_mode():
        emb = ours._embed(ids, pix, None)
        dec = decoder_for(ours.language_model, ours.decode_config)
        dec.generate(emb, mask, max_new_tokens=33)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            dec.generate(emb, mask, max_new_tokens=33)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    Path(args.out, "profile_decode.txt").write_text(table)
    res["profile_decode_top"] = table.splitlines()[:24]
    del ours
    free()


def fmt_table(res: dict) -> str:
    lines = [f"GPU: {res.get('device', {}).get('gpu', '?')}  peak for MFU: {res['peak_flops'] / 1e12:.1f} TFLOP/s"]
    lines += train_table_lines(res)
    if res.get("recipe"):
        a = res["args"]
        lines += recipe_table_lines(res["recipe"], batch=a["recipe_batch"], seq=a["recipe_seq"],
                                    fused_adam=a["recipe_fused_adam"])
    lines += kernel_lines(res)
    if res.get("loss_guard"):
        g = res["loss_guard"]
        lines.append(f"loss guard: plain {g['plain']:.5f} fast {g['fast']:.5f} rel diff {g['rel_diff']:.2e}")
    pack = res.get("pack", [])
    if pack:
        lines.append("\n== packing vs padding (IU length mix) ==")
        for r in pack:
            lines.append(f"{r['case']:32s} useful tok/s {r['useful_tokens_per_s']:9.0f}  slot eff "
                         f"{r['slot_efficiency']:.2f}  peak {r['peak_mem_gib']:.1f} GiB")
        packed = [r for r in pack if r["case"].startswith("packing")]
        for r in pack:
            if packed and not r["case"].startswith("packing"):
                ratio = packed[0]["useful_tokens_per_s"] / r["useful_tokens_per_s"]
                lines.append(f"packing vs {r['case']}: {ratio:.2f}x useful tokens/s")
    gen = res.get("gen", [])
    if gen:
        # weights are read once per step at the measured memory throughput (copy: bytes read + written per second)
        floor = res["decode_weight_bytes"] / res["device"]["copy_bytes_per_s"] * 1e3
        lines.append(f"\n== generation ({gen[0]['new_tokens']} new tokens, greedy) ; weight-bandwidth floor at "
                     f"batch 1: {floor:.3f} ms/step ==")
        lines.append(f"{'case':42s} {'batch':>5s} {'tok/s':>9s} {'TTFT ms':>8s} {'ms/step':>8s}")
        for r in gen:
            lines.append(f"{r['case']:42s} {r['batch']:5d} {r['tokens_per_s']:9.1f} {r['ttft_ms']:8.1f} "
                         f"{r['decode_ms_per_step']:8.3f}")
        for batch in sorted({r["batch"] for r in gen}):
            by = {r["case"].split(" (")[0]: r for r in gen if r["batch"] == batch}
            ours = by.get("ours fast")
            if ours:
                parts = [f"{k}: {ours['tokens_per_s'] / v['tokens_per_s']:.2f}x" for k, v in by.items() if k != "ours fast"]
                lines.append(f"batch {batch}: ours fast vs " + ", ".join(parts))
                if batch == 1:
                    lines.append(f"batch 1: fraction of weight-bandwidth limit {floor / ours['decode_ms_per_step']:.0%}")
        lines.extend(ttft_lines(res))
        lines.extend(variant_lines(res))
    for key in [k for k in res if k == "real" or k.startswith("real_")]:
        real = res[key]
        if not real:
            continue
        lines.append(f"\n== real MedRegA shape ({real['params'] / 1e9:.2f}B params, {real.get('quantize', 'bf16')}, "
                     f"weights {real.get('weights_gib', float('nan')):.1f} GiB, 1 GPU; built in "
                     f"{real['build_s']:.1f}s; {real.get('path', '')}; decode backend {real.get('decode_backend')}, "
                     f"compile scope {real.get('compile_scope', 'auto')}) ==")
        for c in real["cases"]:
            lines.append(f"batch_chat batch {c['batch']}: {c['tokens_per_s']:.1f} tok/s, TTFT {c['ttft_ms']:.0f} ms, "
                         f"{c['decode_ms_per_step']:.1f} ms/step, peak "
                     + " / ".join(f"{g:.1f}" for g in c.get("peak_mem_gib_per_gpu") or [c["peak_mem_gib"]])
                     + " GiB" + (" per GPU" if len(c.get("peak_mem_gib_per_gpu") or []) > 1 else "")
                         + (f"; weight-bytes floor {c['floor_ms']:.2f} ms/step at the measured copy bandwidth: "
                            f"{c['floor_fraction']:.0%} of it" if c.get("floor_ms") else ""))
    for e in res.get("errors", []):
        lines.append(f"ERROR in {e['case']}: {e['error'][:200]}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line (see docs/performance.md for the options each table used)."""
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__)
    p.add_argument("--sections", default="train,pack,gen,real", help="comma list of train,pack,gen,real,profile,"
                   "kernels,recipe")
    p.add_argument("--preset", default="mid")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-variants", default="default",
                   help="comma list of our training variants (lab/bench/train_bench.py TRAIN_VARIANTS: s1, "
                        "padded, compiled, default, outside, skip2, skip4, graphs, maxtune, graphstep), each optionally :on / :off")
    p.add_argument("--train-profile", action="store_true", help="profile the checkpointing-on step (native, s1, "
                   "default) with torch.profiler")
    p.add_argument("--train-profile-full", action="store_true", help="after the timed checkpointing-off cases "
                   "(native, the default and graphs variants) profile 3 full optimizer steps: wall, GPU busy/idle, time by kernel kind "
                   "(lab/bench/train_profile.py)")
    p.add_argument("--train-deadline-s", type=float, default=None, help="skip the remaining training cases after this")
    p.add_argument("--pack-samples", type=int, default=96)
    p.add_argument("--pack-batch", type=int, default=8)
    p.add_argument("--pack-rows", type=int, default=2)
    p.add_argument("--row-len", type=int, default=2048)
    p.add_argument("--reports", default=None, help="path of NLMCXR_reports.tgz")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-batches", default="1,8,32")
    p.add_argument("--static-batches", default="1,32", help="batches at which native static+compiled is timed")
    p.add_argument("--plain-batches", default="1", help="batches at which our plain HF generate is timed")
    p.add_argument("--gen-variants", default="", help="comma list of decode variants (lab/bench/gen_bench.py "
                   "VARIANTS, the first is the baseline of the ratios) timed side by side at batch 1")
    p.add_argument("--gen-variants-batched", default="baseline,packed+tuned", help="variants timed at batches > 1")
    p.add_argument("--gen-cases", default="", help="explicit order of variant cases, e.g. 1:baseline,32:packed "
                   "(batches must be in --gen-batches; real:<variant> times the 40B LLM alone at batch 1; default: --gen-variants at batch 1, then the batched ones)")
    p.add_argument("--gen-profile-variant", default="", help="profile one warm batch-1 generate of this variant")
    p.add_argument("--gen-real-variants", default="", help="variants timed on the 40B shape's LLM alone (batch 1)")
    p.add_argument("--gen-real-new-tokens", type=int, default=64)
    p.add_argument("--native-batches", default="all", help="batches at which native default generate is timed")
    p.add_argument("--gen-deadline-s", type=float, default=None,
                   help="skip (and record) gen cases that would start after this many seconds of the section")
    p.add_argument("--decode-backend", default="inductor", choices=["inductor", "eager", "none"],
                   help="dynamo backend of our decode step (none: plain eager, CPU smoke tests)")
    p.add_argument("--real-batches", default="1,8")
    p.add_argument("--real-new-tokens", type=int, default=128)
    p.add_argument("--real-decode-backend", default="none", choices=["auto", "inductor", "eager", "none"],
                   help="decode backend for the 40B shape (none: static cache, eager step; weight-bound anyway)")
    p.add_argument("--real-compile-scope", default="auto", choices=["auto", "step", "layer"],
                   help="LabDecodeConfig.compile_scope of the real-shape cases (auto: one compiled layer above 5B)")
    p.add_argument("--real-quant", default="bf16", help="comma list of bf16,int8,int8wo: weight formats of the 40B "
                   "shape (int8 = LLM.int8 through bitsandbytes, one GPU; int8wo = our weight-only int8, built layer "
                   "by layer, decoded by our int8 GEMV)")
    p.add_argument("--real-devices", type=int, default=1, help="GPUs the 40B shape is sharded over (device_map)")
    p.add_argument("--real-profile", action="store_true", help="profile one warm batch-1 call of each real-shape "
                   "case after its timing (top CUDA kernels to OUT/profile_real*.txt)")
    p.add_argument("--real-quant-new-tokens", type=int, default=32, help="new tokens per call for the int8 shape")
    p.add_argument("--recipe-models", default="mid,yi", help="recipe section: presets and/or yi (Yi-34B-shaped LLM)")
    p.add_argument("--recipe-layers", type=int, default=None, help="LLM layers of the recipe models (yi: default 4)")
    p.add_argument("--recipe-engines", default="plain,zero2,zero3", help="comma list of " + "; ".join(
        f"{name}: {engine.describe}" for name, engine in ENGINES.items()))
    p.add_argument("--recipe-bf16", choices=("auto", "on", "off"), default="auto", help="the recipe's --bf16 True "
                   "(auto: on CUDA only; on: also on the CPU, CPU autocast / DeepSpeed bf16 - the bf16 loss test)")
    p.add_argument("--recipe-compile-backend", default="inductor", help="torch.compile backend of the engines that "
                   "compile the whole model (zero3_compile, zero3_deepcompile; the CPU test: aot_eager)")
    p.add_argument("--recipe-lora", default="0,16", help="LoRA ranks of the recipe cases (0 = full LLM)")
    p.add_argument("--recipe-batch", type=int, default=4)
    p.add_argument("--recipe-seq", type=int, default=2048)
    p.add_argument("--recipe-steps", type=int, default=4)
    p.add_argument("--recipe-warmup", type=int, default=2)
    p.add_argument("--recipe-lr", type=float, default=1e-5, help="learning rate of the recipe cases (constant)")
    p.add_argument("--recipe-distinct-batches", type=int, default=None, help="batches the recipe steps cycle "
                   "through (default: a new one each step; 1: the same batch, so the losses fall - the CPU test)")
    p.add_argument("--recipe-profile", action="store_true", help="write each case's first timed step's top kernels "
                   "to <out>/recipe_runs/profile_<case>.txt (torch.profiler; those runs' tokens/s include its overhead)")
    p.add_argument("--recipe-deadline-s", type=float, default=None, help="skip (and record) recipe cases that "
                   "would start after this many seconds of the section")
    p.add_argument("--recipe-fused-adam", action="store_true", help="keep the shipped configs' DeepSpeed fused Adam "
                   "(a CUDA extension build) instead of torch's AdamW")
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (smoke test on a tiny preset)")
    p.add_argument("--peak", type=float, default=H100_H200_BF16_PEAK, help="peak FLOP/s for MFU")
    return p


def parse_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse and check the options: comma lists become lists, variant names are checked (`p.error` otherwise)."""
    args = p.parse_args(argv)
    args.gen_batches = [int(x) for x in args.gen_batches.split(",") if x]
    args.static_batches = [int(x) for x in args.static_batches.split(",") if x]
    args.plain_batches = [int(x) for x in args.plain_batches.split(",") if x]
    args.native_batches = None if args.native_batches == "all" else [int(x) for x in args.native_batches.split(",") if x]
    args.gen_variants = parse_variants(args.gen_variants)
    args.gen_variants_batched = parse_variants(args.gen_variants_batched)
    args.gen_real_variants = parse_variants(args.gen_real_variants)
    args.gen_cases = [(c.split(":")[0] if c.startswith("real:") else int(c.split(":")[0]), c.split(":")[1])
                      for c in args.gen_cases.split(",") if c.strip()]
    parse_variants(",".join(name for _, name in args.gen_cases))
    if any(batch != "real" and batch not in args.gen_batches for batch, _ in args.gen_cases):
        p.error("--gen-cases uses a batch that is not in --gen-batches")
    if args.gen_cases and not args.gen_variants:
        args.gen_variants = list(dict.fromkeys(name for b, name in args.gen_cases if b != "real"))
    args.real_batches = [int(x) for x in args.real_batches.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the asked sections, writing `bench.json` after each and `bench_table.txt` at the end."""
    p = build_parser()
    args = parse_args(p, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA GPU: the benchmark needs one (use --device cpu --preset tiny for a smoke test)")
    args.dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    Path(args.out).mkdir(parents=True, exist_ok=True)
    config = load_preset(args.preset, ps_version="v2")  # the native class only has pixel-shuffle v2
    res: dict = {"args": {k: str(v) if isinstance(v, torch.dtype) else v for k, v in vars(args).items()}, "peak_flops": args.peak,
                 "flops_formula": "see lab/bench/flops.py and docs/performance.md"}
    res["device"] = device_ceilings() if args.device == "cuda" else {"gpu": "cpu", "copy_bytes_per_s": 1e10}
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in sections:
        t0 = time.perf_counter()
        log.info("section %s", name)
        if name == "train":
            _guard(res, "section_train", section_train, args, res, config)
        elif name == "pack":
            _guard(res, "section_pack", section_pack, args, res, config)
        elif name == "gen":
            _guard(res, "section_gen", section_gen, args, res, config)
        elif name == "profile":
            _guard(res, "section_profile", section_profile, args, res, config)
        elif name == "kernels":
            _guard(res, "section_kernels", section_kernels, args, res)
        elif name == "recipe":
            _guard(res, "section_recipe", section_recipe, args, res)
        elif name == "real":
            for quant in [q.strip() for q in args.real_quant.split(",") if q.strip()]:
                key = "real" if quant == "bf16" else f"real_{quant}"
                res[key] = _guard(res, key, run_real_shape, batches=args.real_batches,
                                  new_tokens=args.real_new_tokens if quant == "bf16" else args.real_quant_new_tokens,
                                  decode_backend=None if args.real_decode_backend == "none" else args.real_decode_backend,
                                  compile_scope=args.real_compile_scope,
                                  quantize=None if quant == "bf16" else quant, devices=args.real_devices,
                                  device=args.device, dtype=args.dtype,
                                  preset="medrega" if args.device == "cuda" else args.preset,  # CPU: smoke test
                                  copy_bytes_per_s=res["device"]["copy_bytes_per_s"],
                                  profile_path=Path(args.out, f"profile_{key}.txt") if args.real_profile else None)
        else:
            p.error(f"unknown section {name!r}")
        res.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        Path(args.out, "bench.json").write_text(json.dumps(res, indent=1, default=str))
    table = fmt_table(res)
    Path(args.out, "bench_table.txt").write_text(table + "\n")
    print(table)
    failed = [e["case"] for e in res.get("errors", [])]
    if failed:  # the finished cases are in bench.json; a failed case fails the command (scripts must not only print)
        print(f"lab.bench: {len(failed)} case(s) failed: {', '.join(failed)} (tracebacks in {args.out}/bench.json)",
              file=sys.stderr)
        return 1
    return 0
