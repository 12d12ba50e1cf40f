"""Training-step benchmark cases: ours (fast kernels + fused LM-head loss) vs native, checkpointing on/off, and
packing vs padding on the IU length mix. A plain loop: forward, backward, fused AdamW step."""
from __future__ import annotations

import gc
import logging
import time

import torch

from ..ops import causal_lm_loss, disable_fast_kernels, enable_fast_kernels
from .batches import Batch
from .flops import ModelShape, mfu, train_step_flops

logger = logging.getLogger(__name__)


def ours_loss(model, b: Batch, *, fast: bool) -> torch.Tensor:
    """Loss of our model on a batch; `fast` runs the LM head + CE fused on supervised positions only (the model's
    own `fused_loss` path when the model has it, forced on with "always" so the CPU smoke test exercises it too)."""
    flags = torch.ones(b.pixel_values.shape[0], dtype=torch.long, device=b.input_ids.device)
    if hasattr(model, "fused_loss") or not fast:
        if hasattr(model, "fused_loss"):
            model.fused_loss = "always" if fast else False
        return model(pixel_values=b.pixel_values, input_ids=b.input_ids, attention_mask=b.attention_mask,
                     position_ids=b.position_ids, image_flags=flags, labels=b.labels).loss
    embeds = model._embed(b.input_ids, b.pixel_values, flags)
    hidden = model.language_model.get_decoder()(
        inputs_embeds=embeds, attention_mask=b.attention_mask, position_ids=b.position_ids, use_cache=False
    ).last_hidden_state
    return causal_lm_loss(hidden, model.language_model.get_output_embeddings(), b.labels)


def native_loss(model, b: Batch) -> torch.Tensor:
    """Loss of transformers' InternVLForConditionalGeneration (its own ForCausalLMLoss over full logits)."""
    return model(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                 position_ids=b.position_ids, labels=b.labels).loss


def set_fast(model, fast: bool) -> None:
    """Turn the fused norm/SwiGLU kernels on or off on our model instance."""
    if fast:
        enable_fast_kernels(model)
    else:
        disable_fast_kernels(model)


def run_train_case(name: str, model, loss_fn, batches: list[Batch], *, shape: ModelShape, steps: int, warmup: int,
                   ckpt: bool, peak_flops: float) -> dict:
    """Time `steps` optimizer steps (after `warmup`) cycling over `batches`; returns the case's figures."""
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=params[0].is_cuda)
    cuda = params[0].is_cuda
    losses: list[float] = []
    for i in range(warmup):
        loss = loss_fn(model, batches[i % len(batches)])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    tokens = samples = supervised = 0
    flops = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        tokens += b.real_tokens
        samples += len(b.doc_lengths)
        supervised += b.supervised
        flops += train_step_flops(shape, tokens=b.real_tokens, supervised=b.supervised, doc_lengths=b.doc_lengths,
                                  images=b.pixel_values.shape[0])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    del opt
    model.zero_grad(set_to_none=True)
    return {
        "case": name,
        "ckpt": ckpt,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "useful_tokens_per_s": tokens / seconds,
        "peak_mem_gib": peak,
        "mfu": mfu(flops, seconds, peak_flops),
        "tflops_per_s": flops / seconds / 1e12,
        "loss_last": float(losses[-1]) if losses else float("nan"),
    }


def loss_agreement(model, batch: Batch) -> dict:
    """Guard on the device: our fast loss vs the plain path on the same batch and weights (relative difference)."""
    model.eval()
    with torch.no_grad():
        set_fast(model, False)
        plain = float(ours_loss(model, batch, fast=False))
        set_fast(model, True)
        fast = float(ours_loss(model, batch, fast=True))
    model.train()
    return {"plain": plain, "fast": fast, "rel_diff": abs(fast - plain) / max(abs(plain), 1e-12)}


def free(*objs) -> None:
    """Drop references and return cached device memory, so the next case's peak starts clean."""
    for obj in objs:
        del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
