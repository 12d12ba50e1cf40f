"""The real MedRegA shape (InternViT-6B + Yi-34B, ~40B parameters) with random bf16 weights built on the GPU
(meta-device construction, storage allocated and filled on the device), timed through the user-facing
`batch_chat` at batch 1 and 8."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .gen_bench import _timed

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
    from internvl.tokenization import load_tokenizer, train_sentencepiece_tokenizer

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


def run_real_shape(*, batches=(1, 8), new_tokens: int = 128, device: str = "cuda", preset: str = "medrega",
                   dtype: torch.dtype = torch.bfloat16, decode_backend: str | None = None) -> dict:
    """Build `preset` (default: the real MedRegA shape) on `device` and time batch_chat at each batch size.

    `decode_backend` is the dynamo backend of the fast decode step (None: static cache with an eager step and no
    CUDA graph; the 40B decode is bound by reading its 80 GB of weights, so fusion and graphs buy little there and
    a 60-layer trace/compile would cost minutes of a short lease)."""
    from internvl.model import load_preset

    from .build import build_ours

    cuda = str(device).startswith("cuda")
    t0 = time.perf_counter()
    config = load_preset(preset)
    model = build_ours(config, device=device, dtype=dtype).eval()
    model.language_model.fast_decode_backend = decode_backend
    _sync(device)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else float("nan")
    path = ("batch_chat -> static-cache greedy decoder (model.fast_generate)" if hasattr(model, "fast_generate")
            else "batch_chat -> transformers generate (dynamic cache)")
    out = {"preset": preset, "params": n_params, "build_s": build_s, "weights_gib": weights_gib,
           "decode_backend": decode_backend, "path": path, "cases": []}
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
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ttft, _ = _timed(lambda: call(1), 1)
        full, answers = _timed(lambda: call(new_tokens), 1)
        out["cases"].append({
            "batch": batch,
            "new_tokens": new_tokens,
            "seconds": full,
            "tokens_per_s": batch * new_tokens / full,
            "ttft_ms": ttft * 1e3,
            "decode_ms_per_step": (full - ttft) / max(new_tokens - 1, 1) * 1e3,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "warmup_s": warm_s,
            "answer_chars": [len(a) for a in answers],
        })
    model = None  # drop the 40B weights before anything else runs
    if cuda:
        torch.cuda.empty_cache()
    return out
