"""The real MedRegA shape (InternViT-6B + Yi-34B, ~40B parameters) with random bf16 weights built on the GPU
(meta-device construction, storage allocated and filled on the device), timed through the user-facing
`batch_chat` at batch 1 and 8; optionally with the language model's linears quantised to 8-bit (LLM.int8 through
bitsandbytes, the same modules `load_pretrained(load_in_8bit=True)` quantises), still without a host copy."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from internvl.constants import SKIP_QUANT_MODULES
from internvl.model import load_preset
from internvl.model.loading import build_on_meta
from internvl.ops.int8_weights import Int8Linear, quantize_int8_weights_, replace_linears_
from internvl.tokenization import load_tokenizer, train_sentencepiece_tokenizer
from lab.decode_variants import LabDecodeConfig

from .build import build_ours, build_ours_sharded, randomize_, shard_device_map
from .flops import decode_weight_bytes
from .gen_bench import _timed, profile_replays
from .kernel_bench import describe_tuning
from .runtime import free

QUESTIONS = [
    "Please describe the findings of this chest X-ray.",
    "Is there any abnormality in the left lung?",
    "Which organ is shown in this image?",
    "Please write a radiology report for this image.",
    "Locate the heart in this image.",
    "What imaging modality is this?",
    "Is there pleural effusion?",
    "Describe the lesion and give its position.",
]


def bench_tokenizer(workdir: Path):
    """A small SentencePiece tokenizer with the ChatML + InternVL tokens (the real Yi tokenizer is not offline);
    batch_chat only needs ids below the model's vocabulary."""
    corpus = [q.lower() + " " + q for q in QUESTIONS] * 20 + [
        "the lungs are clear . no pleural effusion or pneumothorax . heart size is normal .",
        "findings : mild cardiomegaly . impression : no acute cardiopulmonary abnormality .",
        "answer the questions . 请描述这张图像的发现 。 肺部清晰 , 心影不大 。",
    ] * 40
    out = train_sentencepiece_tokenizer(corpus, workdir / "tok", vocab_size=400)
    return load_tokenizer(out)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def quantize_int8_(model: nn.Module, skip_modules=None, threshold: float = 6.0) -> int:
    """Replace every `nn.Linear` of `model` outside `skip_modules` by bitsandbytes' `Linear8bitLt` (LLM.int8,
    row-wise absmax int8 weights + outlier threshold), quantising each weight where it lies, one layer at a time
    (peak memory = the bf16 model plus one layer's fp16 copy). Returns how many linears were replaced.

    `skip_modules` defaults to the loader's list (`vision_model`, `mlp1`, `lm_head`), so the result is the module
    set `load_pretrained(..., load_in_8bit=True)` produces through transformers; `threshold` is transformers'
    default `llm_int8_threshold`. For random-weight benchmarks; real checkpoints go through `load_pretrained`."""
    import bitsandbytes as bnb  # optional (CUDA builds only): imported where int8 is asked for

    def make(linear: nn.Linear) -> nn.Module:
        int8 = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                   has_fp16_weights=False, threshold=threshold, device="meta")
        weight = bnb.nn.Int8Params(linear.weight.data, requires_grad=False, has_fp16_weights=False)
        int8.weight = weight._quantize(linear.weight.device)
        if linear.bias is not None:
            int8.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        return int8

    return replace_linears_(model, tuple(SKIP_QUANT_MODULES if skip_modules is None else skip_modules), make)


def build_int8wo(config, *, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Our model with random weights and the language model's linears in weight-only int8 (`Int8Linear`, the module
    set `load_pretrained(..., weight_dtype="int8")` gives), built without the bf16 model ever existing whole: meta
    construction, then on `device` the towers, embeddings, final norm and LM head in `dtype`, and each decoder layer
    materialised in `dtype`, randomised and quantised at once (peak = the int8 model plus one bf16 layer)."""
    model = build_on_meta(config).to(dtype=dtype)
    lm = model.language_model
    for part in (model.vision_model, model.mlp1, lm.model.embed_tokens, lm.model.norm, lm.lm_head, lm.model.rotary_emb):
        randomize_(part.to_empty(device=device))
    for i, layer in enumerate(lm.model.layers):
        randomize_(layer.to_empty(device=device), seed=i + 1)
        quantize_int8_weights_(layer, skip_modules=(), device=device)
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"still on the meta device after materialising: {left[:5]}")
    return model


def run_real_shape(*, batches=(1, 8), new_tokens: int = 128, device: str = "cuda", preset: str = "medrega",
                   dtype: torch.dtype = torch.bfloat16, decode_backend: str | None = None,
                   quantize: str | None = None, devices: int = 1, copy_bytes_per_s: float | None = None,
                   profile_path: str | Path | None = None, compile_scope: str = "auto") -> dict:
    """Build `preset` (default: the real MedRegA shape) on `device` and time batch_chat at each batch size.

    `decode_backend` is the dynamo backend of the fast decode step ("auto": the product's default, which compiles
    one decoder layer with inductor on this shape; None: static cache with an eager step and no CUDA graph) and
    `compile_scope` its `LabDecodeConfig.compile_scope` (a whole-step inductor compile of the 60 layers takes about a
    minute per shape). `quantize="int8"` quantises the language model's
    linears with `quantize_int8_` after the bf16 build (its decode step then always runs eagerly: LLM.int8's outlier
    split is data-dependent and cannot be captured in a CUDA graph). `quantize="int8wo"` builds the language
    model's linears in weight-only int8 layer by layer (`build_int8wo`; decoded by our int8 GEMV in the packed,
    graph-captured step with `decode_backend`). `devices` > 1 shards the model over that many GPUs with a balanced
    `device_map` (each layer built on its own GPU) and reports the peak memory of each. With `copy_bytes_per_s` (the
    device's measured copy bandwidth) each case also gets the weight-bytes floor of a batch-1 step and its fraction.
    With `profile_path` (CUDA), one warm batch-1 call is profiled after the timed ones (torch.profiler's top kernels,
    written there; the first lines also go into the result)."""
    if quantize not in (None, "int8", "int8wo"):
        raise ValueError(f"quantize must be None, 'int8' or 'int8wo', got {quantize!r}")
    if quantize == "int8wo" and devices > 1:
        raise ValueError("quantize='int8wo' builds on one device")
    cuda = str(device).startswith("cuda")
    t0 = time.perf_counter()
    config = load_preset(preset)
    device_map = None
    if devices > 1:
        if not cuda or torch.cuda.device_count() < devices:
            raise RuntimeError(f"devices={devices} needs that many CUDA GPUs; {torch.cuda.device_count()} visible")
        device_map = shard_device_map(build_on_meta(config).to(dtype=dtype),
                                      {i: torch.cuda.mem_get_info(i)[1] * 0.9 for i in range(devices)}, dtype)
        model = build_ours_sharded(config, device_map, dtype=dtype).eval()
    elif quantize == "int8wo":
        model = build_int8wo(config, device=device, dtype=dtype).eval()
    else:
        model = build_ours(config, device=device, dtype=dtype).eval()
    quantized = sum(type(m) is Int8Linear for m in model.modules())  # int8wo's (none otherwise)
    if quantize == "int8":
        quantized = quantize_int8_(model)
        decode_backend = None
        if cuda:
            torch.cuda.empty_cache()
    model.decode_config = LabDecodeConfig(backend=decode_backend, compile_scope=compile_scope)
    _sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    gpus = list(range(max(devices, 1))) if cuda else []
    weights_gib = sum(torch.cuda.memory_allocated(i) for i in gpus) / 2**30 if cuda else float("nan")
    path = ("batch_chat -> static-cache greedy decoder (model.fast_generate)" if hasattr(model, "fast_generate")
            else "batch_chat -> transformers generate (dynamic cache)")
    weight_bytes = decode_weight_bytes(model)
    floor_ms = weight_bytes / copy_bytes_per_s * 1e3 if copy_bytes_per_s else None
    out = {"preset": preset, "params": n_params, "decode_weight_bytes": weight_bytes, "floor_ms": floor_ms, "build_s": build_s, "weights_gib": weights_gib,
           "decode_backend": decode_backend, "compile_scope": compile_scope, "path": path, "quantize": quantize or "bf16",
           "quantized_linears": quantized, "devices": max(devices, 1),
           "device_map_gpus": sorted({str(d) for d in device_map.values()}) if device_map else None, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        tok = bench_tokenizer(Path(tmp))
    size = config.force_image_size or config.vision_config.image_size
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, generator=gen).to(device, dtype)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]

        def call(n: int) -> list[str]:
            cfg = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False}
            return model.batch_chat(tok, pixels, questions, generation_config=cfg)

        warm0 = time.perf_counter()
        call(new_tokens)
        call(1)
        _sync(device)
        warm_s = time.perf_counter() - warm0
        for i in gpus:
            torch.cuda.reset_peak_memory_stats(i)
        ttft, _ = _timed(lambda: call(1), 1)
        full, answers = _timed(lambda: call(new_tokens), 1)
        out["cases"].append({
            "batch": batch,
            "new_tokens": new_tokens,
            "seconds": full,
            "tokens_per_s": batch * new_tokens / full,
            "ttft_ms": ttft * 1e3,
            "decode_ms_per_step": (full - ttft) / max(new_tokens - 1, 1) * 1e3,
            "peak_mem_gib": max(torch.cuda.max_memory_allocated(i) for i in gpus) / 2**30 if cuda else float("nan"),
            "peak_mem_gib_per_gpu": [torch.cuda.max_memory_allocated(i) / 2**30 for i in gpus],
            "warmup_s": warm_s,
            "answer_chars": [len(a) for a in answers],
        })
        if floor_ms and batch == 1:
            step = out["cases"][-1]["decode_ms_per_step"]
            out["cases"][-1].update(floor_ms=floor_ms, floor_fraction=floor_ms / step)
        if profile_path and cuda and batch == 1:
            out["profile_top"] = profile_replays(call, new_tokens, str(profile_path))
    out["gemv_tuning"] = describe_tuning()  # the GEMV block configurations the decode step's shapes got
    model = call = None  # drop the 40B weights before anything else runs: the compiled decode step's caches and the
    free(reset_compiled=True)  # CUDA graphs also reference the model, so dynamo is reset too
    return out

