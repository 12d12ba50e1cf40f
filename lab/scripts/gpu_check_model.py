#!/usr/bin/env python3
"""GPU check of the model core: bf16 forward+backward and chat() for the `tiny` and `mid` presets, time per step
and peak memory, HF-native parity on the GPU, device_map loading (incl. a forced GPU/CPU split), and 8-bit/4-bit
loading when bitsandbytes imports.  Random weights; the tiny SentencePiece test tokenizer.

    python -m lab.scripts.gpu_check_model --out OUT_DIR [--device cuda] [--quick]

Every timing is also given as a ratio to a bf16 8192^3 matmul measured in the same process (the machines are
shared and noisy).  Results go to OUT_DIR/gpu_check_model.json (written after every section); a failing section is
recorded and the next one still runs.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import InternVLForConditionalGeneration

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.model import InternVLChatModel, load_preset
from internvl.model.hf_conversion import convert_config_to_hf, convert_state_dict_to_hf
from internvl.model.loading import count_parameters, load_pretrained
from internvl.testing import build_tiny_tokenizer_dir
from internvl.tokenization import load_tokenizer, save_tokenizer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, warmup: int, iters: int) -> float:
    """Mean seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def matmul_baseline(device: str, quick: bool) -> dict:
    n = 512 if quick else 8192
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32  # bf16 matmul is emulated on most CPUs
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = timed(lambda: a @ b, device, 3, 10)
    return {"n": n, "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def build(name: str, tokenizer, device: str) -> InternVLChatModel:
    config = load_preset(name)
    if name == "tiny":
        config.llm_config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = InternVLChatModel(config)
    model.to(torch.bfloat16)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    return model


def batch(model: InternVLChatModel, tokenizer, batch_size: int, seq_len: int, device: str):
    """Random training batch: one tile per sample, `<img>` + context tokens + random text, labels on the text."""
    ctx = model.img_context_token_id
    n_img = model.num_image_token
    start, end = tokenizer.convert_tokens_to_ids("<img>"), tokenizer.convert_tokens_to_ids("</img>")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 900, (batch_size, seq_len), generator=g)
    ids[:, 0], ids[:, 1 : 1 + n_img], ids[:, 1 + n_img] = start, ctx, end
    labels = ids.clone()
    labels[:, : 2 + n_img] = -100
    size = model.config.image_size
    pixel_values = torch.randn(batch_size, 3, size, size, generator=g)
    return (pixel_values.to(device, torch.bfloat16), ids.to(device), labels.to(device),
            torch.ones(batch_size, dtype=torch.long, device=device))


def train_step_check(model, tokenizer, device, batch_size, seq_len, checkpointing, iters, baseline) -> dict:
    model.train()
    if checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
    pixel_values, ids, labels, flags = batch(model, tokenizer, batch_size, seq_len, device)
    losses = []

    def step():
        model.zero_grad(set_to_none=True)
        out = model(pixel_values=pixel_values, input_ids=ids, labels=labels, image_flags=flags)
        out.loss.backward()
        losses.append(out.loss.detach())

    reset_peak(device)
    seconds = timed(step, device, 2, iters)
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)
    counts = count_parameters(model)
    vit_tokens = batch_size * (1 + (model.config.image_size // model.config.vision_config.patch_size) ** 2)
    flops = 6 * (counts["language_model"] * batch_size * seq_len + counts["vision_model"] * vit_tokens)
    if checkpointing:
        flops = flops * 4 // 3  # recomputed forward
    model.eval()
    return {
        "batch_size": batch_size, "seq_len": seq_len, "gradient_checkpointing": checkpointing,
        "seconds_per_step": seconds, "tokens_per_second": batch_size * seq_len / seconds,
        "peak_memory_gib": peak_gib(device), "loss": float(losses[-1]), "grads_finite": grads_finite,
        "model_tflops": flops / seconds / 1e12, "ratio_to_matmul_baseline": flops / seconds / 1e12 / baseline,
    }


def chat_check(model, tokenizer, device, new_tokens: int, batch_size: int, baseline_seconds: float) -> dict:
    size = model.config.image_size
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(batch_size, 3, size, size, generator=g).to(device, torch.bfloat16)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    reset_peak(device)
    answer = None

    def one():
        nonlocal answer
        answer = model.chat(tokenizer, pixel_values[:1], "Please locate the liver in this CT scan.", gen)

    single = timed(one, device, 1, 2)
    answers: list[str] = []
    questions = [f"Where is the {organ}?" for organ in ("liver", "heart", "spleen", "right lung", "left lung",
                                                      "kidney", "brain", "colon")][:batch_size]

    def many():
        answers[:] = model.batch_chat(tokenizer, pixel_values, questions, gen, num_patches_list=[1] * batch_size)

    batched = timed(many, device, 1, 2)
    return {
        "new_tokens": new_tokens, "chat_seconds": single, "chat_tokens_per_second": new_tokens / single,
        "batch_size": batch_size, "batch_chat_seconds": batched,
        "batch_chat_tokens_per_second": batch_size * new_tokens / batched,
        "chat_ratio_to_matmul_baseline": single / baseline_seconds, "peak_memory_gib": peak_gib(device),
        "sample_answer": answer[:80] if answer else answer,
        "batch_matches_single": answers[0] == model.chat(tokenizer, pixel_values[:1], questions[0], gen),
    }


def parity_check(model: InternVLChatModel, tokenizer, device: str) -> dict:
    """fp32 copy with ps_version v2 vs transformers' native InternVLForConditionalGeneration on the same device."""
    config = InternVLChatModel.config_class(**model.config.to_dict())
    config.ps_version = "v2"
    ours = InternVLChatModel(config).to(device).eval()
    ours.load_state_dict(model.state_dict())
    ours.float()
    ours.img_context_token_id = model.img_context_token_id
    native = InternVLForConditionalGeneration(convert_config_to_hf(config, model.img_context_token_id))
    native.load_state_dict(convert_state_dict_to_hf(ours.state_dict()))
    native = native.to(device).float().eval()
    with torch.no_grad():
        pixel_values, ids, _, _ = batch(ours, tokenizer, 2, 384, device)
        a = ours(pixel_values=pixel_values.float(), input_ids=ids).logits
        b = native(input_ids=ids, pixel_values=pixel_values.float()).logits
    diff = (a - b).abs().max().item()
    del ours, native
    return {"max_abs_logit_diff_fp32": diff, "scale": a.abs().max().item()}


def device_map_check(model, tokenizer, ckpt: Path, device: str) -> dict:
    model.save_pretrained(ckpt, max_shard_size="1GB")
    save_tokenizer(tokenizer, ckpt)
    pixel_values, ids, _, _ = batch(model, tokenizer, 1, 384, device)
    with torch.no_grad():
        ref = model(pixel_values=pixel_values, input_ids=ids).logits.float().cpu()
    results: dict[str, Any] = {"shards": len(list(ckpt.glob("model-*.safetensors")))}
    variants = [("auto", {"device_map": "auto"})]
    if device.startswith("cuda"):
        variants.append(("auto_gpu_cpu_split", {"device_map": "auto", "max_memory": {0: "1GiB", "cpu": "48GiB"}}))
    for label, kwargs in variants:
        try:
            results[label] = _load_and_compare(ckpt, tokenizer, model, kwargs, pixel_values, ids, ref)
        except Exception as exc:  # noqa: BLE001 (keep the other variant's result)
            results[label] = {"error": f"{type(exc).__name__}: {exc}"}
        reset_peak(device)
    return results


def _load_and_compare(ckpt, tokenizer, model, kwargs, pixel_values, ids, ref) -> dict:
    """Load `ckpt` with `kwargs`, compare its logits with the in-memory model's `ref`, run chat()."""
    start = time.perf_counter()
    loaded = load_pretrained(ckpt, dtype=torch.bfloat16, **kwargs)
    load_seconds = time.perf_counter() - start
    loaded.img_context_token_id = model.img_context_token_id
    devices = sorted({str(p.device) for p in loaded.parameters()})
    with torch.no_grad():
        got = loaded(pixel_values=pixel_values, input_ids=ids).logits.float().cpu()
    answer = loaded.chat(tokenizer, pixel_values[:1], "Where is the liver?", dict(max_new_tokens=8, do_sample=False))
    return {"load_seconds": load_seconds, "param_devices": devices,
            "hf_device_map_groups": len(set(getattr(loaded, "hf_device_map", {}).values())),
            "max_abs_logit_diff_vs_in_memory": (got - ref).abs().max().item(), "chat_ran": answer is not None}


def quantized_check(ckpt: Path, tokenizer, device: str, reference: torch.Tensor, inputs) -> dict:
    results: dict[str, Any] = {}
    pixel_values, ids = inputs
    for label, kwargs in (("8bit", {"load_in_8bit": True}), ("4bit", {"load_in_4bit": True})):
        reset_peak(device)
        model = load_pretrained(ckpt, dtype=torch.bfloat16, **kwargs)
        model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
        with torch.no_grad():
            got = model(pixel_values=pixel_values, input_ids=ids).logits.float().cpu()
        gen = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
        seconds = timed(partial(model.chat, tokenizer, pixel_values[:1], "Where is the liver?", gen), device, 1, 2)
        results[label] = {
            "memory_footprint_gib": model.get_memory_footprint() / 2**30, "peak_memory_gib": peak_gib(device),
            "relative_logit_error_vs_bf16": ((got - reference).norm() / reference.norm()).item(),
            "top1_agreement_vs_bf16": (got.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "chat_tokens_per_second": 32 / seconds,
        }
        del model
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny preset only, small sizes (CPU smoke test)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"errors": {}}
    out_file = args.out / "gpu_check_model.json"

    def section(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 (diagnostic run: record any failure, run the next section)
            report["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-2000:]}"
        print(f"[{time.perf_counter() - start:7.1f}s] {name}: {json.dumps(report.get(name), default=str)[:600]}",
              flush=True)
        out_file.write_text(json.dumps(report, indent=2, default=str))
        return report.get(name)

    section("environment", lambda: {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "bitsandbytes": _version("bitsandbytes"), "flash_attn": _version("flash_attn"),
    })
    tmp = Path(tempfile.mkdtemp())
    tokenizer = load_tokenizer(build_tiny_tokenizer_dir(tmp / "tok"))
    base = section("matmul_baseline", lambda: matmul_baseline(args.device, args.quick))
    tflops = base["tflops"] if base else float("nan")
    presets = ["tiny"] if args.quick else ["tiny", "mid"]
    for name in presets:
        model = build(name, tokenizer, args.device)
        big = name == "mid" and not args.quick
        bs, seq, iters = (8, 1024, 10) if big else (4, 64, 5)
        section(f"{name}_params", partial(count_parameters, model))
        section(f"{name}_train_step_ckpt",
                partial(train_step_check, model, tokenizer, args.device, bs, seq, True, iters, tflops))
        section(f"{name}_train_step",
                partial(train_step_check, model, tokenizer, args.device, bs, seq, False, iters, tflops))
        section(f"{name}_chat", partial(chat_check, model, tokenizer, args.device, 64 if big else 16, 8,
                                        base["seconds"] if base else float("nan")))
        if name == presets[-1]:
            section(f"{name}_hf_parity", partial(parity_check, model, tokenizer, args.device))
            ckpt = tmp / f"{name}_ckpt"
            section(f"{name}_device_map", partial(device_map_check, model, tokenizer, ckpt, args.device))
            if _version("bitsandbytes") and args.device.startswith("cuda"):
                pixel_values, ids, _, _ = batch(model, tokenizer, 1, 384, args.device)
                with torch.no_grad():
                    ref = model(pixel_values=pixel_values, input_ids=ids).logits.float().cpu()
                section(f"{name}_quantized",
                        partial(quantized_check, ckpt, tokenizer, args.device, ref, (pixel_values, ids)))
        del model
        reset_peak(args.device)
    print(json.dumps(report["errors"], indent=2)[:3000])
    return 0 if not report["errors"] else 1


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 (missing or broken optional package: report None)
        return None


if __name__ == "__main__":
    sys.exit(main())
