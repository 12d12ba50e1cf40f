"""Generation benchmark cases: one-image prompts, greedy, fixed `new_tokens` (EOS suppressed), tokens/s and TTFT.

TTFT is the median wall time of a call that produces one token (ViT + projector + prefill + first argmax);
tokens/s is batch x new_tokens over the median wall time of the full call; per-step decode time is
(full - TTFT) / (new_tokens - 1).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

from internvl.model import DecodeConfig, load_preset
from internvl.model.fast_generate import decoder_for
from lab.decode_variants import LabDecodeConfig

from .build import materialize
from .flops import decode_weight_bytes


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    out = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def run_gen_case(name: str, generate: Callable[[int], torch.Tensor], *, batch: int, new_tokens: int,
                 warmup: int = 1, repeats: int = 2, warm_tokens: int | None = None) -> dict:
    """`generate(n)` must return [batch, n] new token ids. Warm-up calls (compiles, graph captures) are untimed;
    `warm_tokens` shortens the warm-up call for paths that compile nothing (default: `new_tokens`)."""
    compile_t0 = time.perf_counter()
    for _ in range(warmup):
        generate(warm_tokens or new_tokens)
        generate(1)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    warm_s = time.perf_counter() - compile_t0
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    ttft, _ = _timed(lambda: generate(1), repeats)
    full, out = _timed(lambda: generate(new_tokens), repeats)
    if out.shape != (batch, new_tokens):
        raise RuntimeError(f"{name}: expected [{batch}, {new_tokens}] new tokens, got {tuple(out.shape)}")
    step_ms = (full - ttft) / max(new_tokens - 1, 1) * 1e3
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {
        "case": name,
        "batch": batch,
        "new_tokens": new_tokens,
        "seconds": full,
        "tokens_per_s": batch * new_tokens / full,
        "ttft_ms": ttft * 1e3,
        "decode_ms_per_step": step_ms,
        "warmup_s": warm_s,
        "peak_mem_gib": peak,
        "tokens": out.detach().cpu(),
    }


def ttft_compare(ours: Callable[[int], torch.Tensor], native: Callable[[int], torch.Tensor], *,
                 vision: Callable[[], torch.Tensor], prefill: Callable[[], torch.Tensor], repeats: int = 10) -> dict:
    """Time to first token of our `generate(1)` and native's (default dynamic cache) in the same run, interleaved
    call by call (medians over `repeats`, after one warm call each), with our time split into `vision` (ViT +
    projector + embedding merge, `vision()`), `prefill` (our decoder's prefill forward and first-token pick on ready
    embeddings, `prefill()`) and the rest (host checks, settings, trimming)."""
    fns = {"ours": lambda: ours(1), "native": lambda: native(1), "vision": vision, "prefill": prefill}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn, 1)[0] * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"ours_ms": med["ours"], "native_default_ms": med["native"], "ratio_ours_over_native": med["ours"] / med["native"],
            "vision_ms": med["vision"], "prefill_ms": med["prefill"],
            "rest_ms": med["ours"] - med["vision"] - med["prefill"], "repeats": repeats}


def ttft_lines(res: dict) -> list[str]:
    """The batch-1 TTFT comparison line(s) of `ttft_compare`'s row."""
    t = res.get("ttft_b1")
    if not t:
        return []
    line = (f"batch 1 TTFT (median of {t['repeats']}, interleaved): ours {t['ours_ms']:.1f} ms, native default "
            f"{t['native_default_ms']:.1f} ms, ours/native {t['ratio_ours_over_native']:.2f}; ours = vision "
            f"{t['vision_ms']:.1f} + prefill {t['prefill_ms']:.1f} + rest {t['rest_ms']:.1f} ms")
    return [line]


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far two greedy outputs agree: exact rows and the mean length of the common prefix."""
    same = (a == b)
    prefix = same.long().cumprod(dim=1).sum(dim=1).float()
    return {"rows_equal": int(same.all(dim=1).sum()), "rows": int(a.shape[0]),
            "mean_common_prefix": float(prefix.mean())}


# ----------------------------------------------------------------------------------------------------------------
# Decode-step variants, side by side in one run (`--gen-variants`)
# ----------------------------------------------------------------------------------------------------------------
#: decode-step configuration per variant (backend left "auto": the run's --decode-backend replaces it).
#: "baseline" is the session-1 default (HF forward of the LM, no packing, inductor without tuning); "s2" the
#: session-2 default (packed weights; at batch 1 the model's forward tuned by inductor, elsewhere the packed step);
#: "default" the current default (`DecodeConfig()`: the measured rules, i.e. the packed step with our Triton
#: attention everywhere and our GEMV at batch 1, where Triton runs). "math" / "flex" are lab-only attentions.
_V = LabDecodeConfig
VARIANTS: dict[str, DecodeConfig] = {
    "default": DecodeConfig(),
    "s2": _V(packed="auto", attention="sdpa", tuning="auto", gemv=False),
    "baseline": _V(packed=False, attention="sdpa", tuning=False, gemv=False),
    "tuned": _V(packed=False, attention="sdpa", tuning="auto", gemv=False),
    "packed": _V(packed=True, attention="sdpa", tuning=False, gemv=False),
    "packed+tuned": _V(packed=True, attention="sdpa", tuning="auto", gemv=False),
    "packed+math": _V(packed=True, attention="math", tuning=False, gemv=False),
    "packed+tuned+math": _V(packed=True, attention="math", tuning="auto", gemv=False),
    "tuned+flex": _V(packed=False, attention="flex", tuning="auto", gemv=False),
    "packed+flex": _V(packed=True, attention="flex", tuning=False, gemv=False),
    "packed+tuned+flex": _V(packed=True, attention="flex", tuning="auto", gemv=False),
    "default+flex": _V(packed="auto", attention="flex", tuning="auto", gemv=False),
    # our Triton kernels (internvl/ops/decode_kernels.py): split-cache attention and/or the batch-1 GEMV
    "packed+tuned+triton": _V(packed=True, attention="triton", tuning="auto", gemv=False),
    "packed+tuned+gemv": _V(packed=True, attention="sdpa", tuning="auto", gemv=True),
    "kernels": _V(packed=True, attention="triton", tuning="auto", gemv=True),
    "kernels+untuned": _V(packed=True, attention="triton", tuning=False, gemv=True),
}


def parse_variants(text: str) -> list[str]:
    """Comma list of VARIANTS names -> list (ValueError naming the unknown ones)."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown decode variant(s) {unknown}; known: {sorted(VARIANTS)}")
    return names


def variant_config(name: str, backend: str | None = "auto") -> DecodeConfig:
    """The decode configuration of variant `name` with dynamo backend `backend`."""
    return dataclasses.replace(VARIANTS[name], backend=backend)


def apply_variant(model: Any, name: str) -> None:
    """Give `model` (an InternVLChatModel) the decode configuration of variant `name`, keeping its backend (the next
    generate builds the matching decoder)."""
    model.decode_config = variant_config(name, model.decode_config.backend)


def variant_lines(res: dict) -> list[str]:
    """Table of the decode variants: ms/step, tokens/s, compile/capture seconds, fraction of the weight-bandwidth
    floor (batch 1) and the step-time ratio against the baseline variant of the same batch."""
    rows = [r for r in res.get("gen", []) if "variant" in r]
    if not rows:
        return []
    floor = res["decode_weight_bytes"] / res["device"]["copy_bytes_per_s"] * 1e3
    lines = [f"\n== decode variants (same run; floor {floor:.3f} ms/step at batch 1) ==",
             f"{'variant':20s} {'batch':>5s} {'ms/step':>8s} {'tok/s':>9s} {'TTFT ms':>8s} {'warm s':>7s} "
             f"{'floor %':>7s} {'vs baseline':>11s}"]
    base = {r["batch"]: r for r in rows if r["variant"] == "baseline"}
    for r in rows:
        frac = f"{floor / r['decode_ms_per_step']:.0%}" if r["batch"] == 1 else ""
        b = base.get(r["batch"])
        ratio = f"{b['decode_ms_per_step'] / r['decode_ms_per_step']:.2f}x" if b else ""
        lines.append(f"{r['variant']:20s} {r['batch']:5d} {r['decode_ms_per_step']:8.3f} {r['tokens_per_s']:9.1f} "
                     f"{r['ttft_ms']:8.1f} {r['warmup_s']:7.1f} {frac:>7s} {ratio:>11s}")
    for batch in sorted(base):
        native = next((r for r in res.get("gen", []) if r["batch"] == batch and r["case"].startswith("native static")),
                      None)
        if native:
            lines.append(f"batch {batch}: native static + compiled {native['decode_ms_per_step']:.3f} ms/step; "
                         + ", ".join(f"{r['variant']} {native['decode_ms_per_step'] / r['decode_ms_per_step']:.2f}x"
                                     for r in rows if r["batch"] == batch))
    for r in res.get("gen_real_variants", []):
        if "error" in r:
            lines.append(f"40B LLM decoder only, {r['variant']}: ERROR {r['error'][:160]}")
            continue
        lines.append(f"40B LLM decoder only, {r['variant']:14s} batch {r['batch']}: {r['decode_ms_per_step']:.2f} "
                     f"ms/step, warm {r['warmup_s']:.1f} s, floor {r['floor_ms']:.2f} ms "
                     f"({r['floor_ms'] / r['decode_ms_per_step']:.0%})")
    for s in res.get("gen_skipped", []):
        lines.append(f"skipped (time budget): {s}")
    return lines


def profile_replays(generate: Callable[[int], torch.Tensor], new_tokens: int, path: str) -> list[str]:
    """torch.profiler table (top CUDA kernels) of one already-warm `generate(new_tokens)` call: new_tokens - 1 replays
    of the captured decode step plus one prefill. Written to `path`; returns the first lines."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(new_tokens)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(f"one generate call: prefill + {new_tokens - 1} replayed decode steps at batch 1\n{table}\n")
    return table.splitlines()[:30]


class RealLLM:
    """The 40B shape's language model alone (the Yi-34B-shaped Llama of the `medrega` preset, random bf16 weights
    built on the device, never on the host) with one random-embedding prompt, for timing decode variants at batch 1
    (`backend` dynamo backend + CUDA graph, as the "auto" backend picks for this size)."""

    def __init__(self, *, prompt: int = 300, backend: str | None = "eager", copy_bytes_per_s: float,
                 device: str = "cuda", seed: int = 0, preset: str = "medrega") -> None:
        cfg = load_preset(preset).llm_config
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        t0 = time.perf_counter()
        self.lm = materialize(lambda: LlamaForCausalLM(cfg), device=device, dtype=dtype, seed=seed).eval()
        self.build_s = time.perf_counter() - t0
        self.backend = backend
        self.floor_ms = decode_weight_bytes(self.lm) / copy_bytes_per_s * 1e3
        gen = torch.Generator(device=device).manual_seed(seed)
        self.emb = torch.randn(1, prompt, cfg.hidden_size, device=device, dtype=dtype, generator=gen) * 0.02
        self.mask = torch.ones(1, prompt, dtype=torch.long, device=device)

    def run(self, name: str, new_tokens: int) -> dict:
        """Time variant `name` (warm-up untimed); returns its row."""
        config = variant_config(name, self.backend)

        def generate(k: int) -> torch.Tensor:
            with torch.inference_mode():
                return decoder_for(self.lm, config).generate(self.emb, self.mask, max_new_tokens=k, min_new_tokens=k,
                                                     eos_token_id=[2], pad_token_id=0)

        r = run_gen_case(f"40B LLM [{name}]", generate, batch=1, new_tokens=new_tokens, repeats=1)
        r.pop("tokens")
        return {**r, "variant": name, "floor_ms": self.floor_ms, "backend": self.backend, "build_s": self.build_s}


def real_llm_variants(variants: list[str], *, new_tokens: int = 64, **kwargs) -> list[dict]:
    """`RealLLM(**kwargs)` timed with each of `variants`; a failing variant gives a row with its error."""
    real = RealLLM(**kwargs)
    rows = []
    for name in variants:
        try:
            rows.append(real.run(name, new_tokens))
        except Exception as exc:  # noqa: BLE001 - one variant failing must not lose the others
            rows.append({"variant": name, "error": repr(exc)})
    real = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows
