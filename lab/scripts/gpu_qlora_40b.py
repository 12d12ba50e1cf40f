#!/usr/bin/env python3
"""QLoRA of the real 40.07B MedRegA shape on one GPU: peak memory, tokens/s and a falling loss over 20 steps.

    python lab/scripts/gpu_qlora_40b.py                         # the real shape (60 LLM layers, 45 ViT layers), 20 steps
    python lab/scripts/gpu_qlora_40b.py --layers 4              # quick dry run with 4 LLM layers
    python lab/scripts/gpu_qlora_40b.py --device cpu --layers 1 --vit_layers 1 --seq 512 --batch 1 --steps 6   # CPU

The bf16 40B does not fit 80 GB, and there are no released weights on the machine, so the model is built on the meta
device and materialised on the GPU piece by piece with random weights: the ViT, projector, embeddings and LM head in
bf16; then each LLM decoder layer in bf16, its linear layers replaced at once by bitsandbytes NF4 `Linear4bit`
(`quantize_linears_` below, double quantisation, the same spec as `medrega-train --load_in_4bit`), so at
most one bf16 layer exists at a time. From there the path is medrega-train's: `prepare_kbit_training`,
`apply_freezing` (LoRA r16 on the LLM, ViT/projector frozen), non-reentrant gradient checkpointing, `MedRegTrainer`
(HF Trainer, bf16 autocast, fused LM-head loss, AdamW) on `pad_collate` batches.

Data: one synthetic sample repeated (an image of 256 tokens + random text, `--seq` tokens), `--batch` per step, so the
loss must fall. Printed: loss per step, peak GPU memory (allocated and reserved), tokens/s over steps 5..N, the
datasheet MFU as issue #18 counts it (6 x LLM parameters x tokens/s over 989 TFLOP/s), and the memory plan's QLoRA
estimate (`lab.memory_plan.qlora_row`) beside the measured peak. A JSON summary goes to $OUT (or --out).
Exit 1 when the peak allocated memory exceeds --max_peak_gib (70) or the loss does not fall (mean of the last 5
steps not below the mean of the first 5).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded (bitsandbytes' optional hub kernels included)
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from internvl.compat import set_attn_implementation  # noqa: E402
from internvl.data.collate import pad_collate  # noqa: E402
from internvl.model import InternVLChatModel, load_preset  # noqa: E402
from internvl.ops.int8_weights import replace_linears_  # noqa: E402
from internvl.train import qlora  # noqa: E402
from internvl.train.arguments import MedRegTrainingArguments, ModelArguments  # noqa: E402
from internvl.train.build import apply_freezing, enable_gradient_checkpointing, trainable_by_tower  # noqa: E402
from internvl.train.cli import speedups_from_args  # noqa: E402
from internvl.train.trainer import MedRegTrainer  # noqa: E402
from lab.memory_plan import GiB, count_params, qlora_row  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (datasheet), the yardstick


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="medrega")
    p.add_argument("--layers", type=int, default=None, help="LLM decoder layers (default: the preset's, 60)")
    p.add_argument("--vit_layers", type=int, default=None, help="ViT layers (default: the preset's, 45)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="samples per step (the recipe's per-GPU micro-batch)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (QLoRA's)")
    p.add_argument("--max_peak_gib", type=float, default=70.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="weights and compute (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_qlora_40b"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def model_config(args: argparse.Namespace):
    """The preset's config with the layer overrides, SDPA attention, no KV cache."""
    config = load_preset(args.preset)
    if args.layers is not None:
        config.llm_config.num_hidden_layers = args.layers
    if args.vit_layers is not None:
        config.vision_config.num_hidden_layers = args.vit_layers
    set_attn_implementation(config.llm_config, "sdpa")
    config.llm_config.use_cache = False
    config.use_llm_lora = 0
    config.use_backbone_lora = 0
    return config


@torch.no_grad()
def random_init_(module: nn.Module, std: float) -> None:
    """Random weights for a freshly materialised module: N(0, std) for matrices and embeddings, 1 for norm weights,
    0.1 for InternViT's layer scales (ls1/ls2), 0 for biases."""
    for name, param in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("ls1", "ls2"):
            param.fill_(0.1)
        elif leaf == "bias":
            param.zero_()
        elif param.ndim == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)


def materialise(module: nn.Module, device: torch.device, std: float) -> None:
    module.to_empty(device=device)
    random_init_(module, std)


def quantize_linears_(module: nn.Module, spec: dict, device: torch.device) -> int:
    """Replace every `nn.Linear` under `module` (except `spec["skip_modules"]` names) by a `bitsandbytes` 4-bit layer
    quantised on `device` (transformers' loader cannot do this for a model materialised layer by layer). Returns the
    count."""
    import bitsandbytes as bnb

    dtype = getattr(torch, spec["dtype"])

    def make(child: nn.Linear) -> nn.Module:
        layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=dtype, compress_statistics=spec["double_quant"],
                                  quant_type=spec["quant_type"], device="meta")
        layer.weight = bnb.nn.Params4bit(child.weight.data.to(dtype), requires_grad=False,
                                         quant_type=spec["quant_type"], compress_statistics=spec["double_quant"],
                                         blocksize=spec["blocksize"])
        if child.bias is not None:
            layer.bias = nn.Parameter(child.bias.data.to(dtype), requires_grad=False)
        return layer.to(device)  # moving the weight there quantises it

    return replace_linears_(module, spec["skip_modules"], make)


def build_4bit_model(config, spec: dict, dtype: torch.dtype, device: torch.device) -> InternVLChatModel:
    """Meta-device build, then per part on `device`: bf16 towers, and each LLM layer quantised right after it is
    materialised (the bf16 layer is freed when its linears are replaced)."""
    with torch.device("meta"):
        model = InternVLChatModel(config).to(dtype)
    std = config.llm_config.initializer_range
    lm = model.language_model
    for part in (model.vision_model, model.mlp1, lm.model.embed_tokens, lm.model.norm, lm.lm_head):
        materialise(part, device, std)
    with torch.device(device):  # its buffers (inv_freq) are computed at construction: build it again, on the device
        lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm.config)
    quantised = 0
    for layer in lm.model.layers:
        materialise(layer, device, std)
        quantised += quantize_linears_(layer, spec, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"still on the meta device after materialising: {left[:5]}")
    print(f"[build] {quantised} LLM linears in 4-bit {spec['quant_type']} on {device}", flush=True)
    return model


class SyntheticRepeat(torch.utils.data.Dataset):
    """One fixed sample (an image's tokens, then random text; all text supervised), returned `n` times."""

    def __init__(self, config, seq: int, n: int, img_context_id: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        image_tokens = config.num_image_token
        if seq <= image_tokens + 8:
            raise ValueError(f"--seq {seq} leaves no text after {image_tokens} image tokens")
        text = torch.randint(100, min(config.llm_config.vocab_size - 16, 60000), (seq - image_tokens - 1,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((image_tokens,), img_context_id), text])
        labels = ids.clone()
        labels[: image_tokens + 1] = -100
        size = config.force_image_size or config.vision_config.image_size
        self.item = {"input_ids": ids, "labels": labels,
                     "pixel_values": torch.randn(1, 3, size, size, generator=g),
                     "image_flags": torch.ones(1, dtype=torch.long)}
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return dict(self.item)


class StepClock(TrainerCallback):
    """Wall time of every optimizer step (device-synchronised at both ends)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def train(model: nn.Module, config, args: argparse.Namespace, device: torch.device,
          bf16: bool) -> tuple[list[float], list[float]]:
    """`args.steps` steps of MedRegTrainer on the repeated sample; returns (losses, step seconds)."""
    model_args = ModelArguments(preset=args.preset, use_llm_lora=args.lora_rank, load_in_4bit=True,
                                grad_checkpoint=True)
    qlora.prepare_kbit_training(model)
    apply_freezing(model, model_args)  # LoRA r16 on the LLM; ViT and projector frozen (the QLoRA defaults)
    enable_gradient_checkpointing(model)
    towers = trainable_by_tower(model)
    print("[build] trainable:", {k: v["trainable"] for k, v in towers.items()}, flush=True)
    img_context_id = config.llm_config.vocab_size - 1
    model.img_context_token_id = img_context_id
    dataset = SyntheticRepeat(config, args.seq, args.steps * args.batch, img_context_id, args.seed)
    cuda = device.type == "cuda"
    training_args = MedRegTrainingArguments(
        output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1, save_strategy="no",
        report_to="none", bf16=bf16, use_cpu=not cuda, seed=args.seed, disable_tqdm=True, max_grad_norm=1.0)
    clock = StepClock()
    trainer = MedRegTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=pad_collate,
                            fused_lm_loss=True, speedups=speedups_from_args(model_args), callbacks=[clock])
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return losses, clock.times


def report(args, config, losses: list[float], times: list[float], device: torch.device) -> dict:
    """Print and return the measured figures next to the memory plan's estimate."""
    counts, _ = count_params(args.preset, args.lora_rank, layers=args.layers, vit_layers=args.vit_layers)
    plan = qlora_row(counts, config, args.seq, args.batch)
    tokens = args.batch * args.seq
    first = min(4, max(len(times) - 1, 0))  # steps 5..N (index 4 on)
    tps = tokens * len(times[first:]) / max(sum(times[first:]), 1e-9)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "preset": args.preset,
           "llm_layers": config.llm_config.num_hidden_layers, "vit_layers": config.vision_config.num_hidden_layers,
           "params_total_B": counts.total / 1e9, "params_llm_B": counts.llm / 1e9, "lora_params_M": counts.lora_llm / 1e6,
           "batch": args.batch, "seq": args.seq, "steps": len(losses), "losses": losses, "step_seconds": times,
           "tokens_per_second_steps_5_on": tps, "mfu_6N_llm": 6 * counts.llm * tps / H100_BF16_PEAK,
           "plan_total_GiB": plan["total_GiB"], "plan_weights_GiB": plan["frozen_GiB"],
           "plan_activations_GiB": plan["activations_GiB"], "plan_lora_states_GiB": plan["states_GiB"]}
    if device.type == "cuda":
        out["peak_allocated_GiB"] = torch.cuda.max_memory_allocated() / GiB
        out["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / GiB
    for step, (loss, sec) in enumerate(zip(losses, times), start=1):
        print(f"step {step:3d}  loss {loss:.4f}  {sec:6.2f} s  {tokens / sec:8.0f} tokens/s")
    print(f"model: {counts.total / 1e9:.2f}B parameters ({counts.llm / 1e9:.2f}B LLM in 4-bit NF4 linears), "
          f"LoRA r{args.lora_rank} {counts.lora_llm / 1e6:.1f}M; {args.batch} x {args.seq} tokens per step")
    print(f"tokens/s over steps {first + 1}..{len(times)}: {tps:,.0f}  (target >= 1,000; datasheet MFU "
          f"6*N_llm*tokens/s / 989 TFLOP/s = {100 * out['mfu_6N_llm']:.1f} %)")
    if "peak_allocated_GiB" in out:
        print(f"peak GPU memory: allocated {out['peak_allocated_GiB']:.1f} GiB, reserved "
              f"{out['peak_reserved_GiB']:.1f} GiB; memory plan (python -m lab.memory_plan) "
              f"{plan['total_GiB']:.1f} GiB = weights {plan['frozen_GiB']:.1f} + LoRA states {plan['states_GiB']:.1f} "
              f"+ activations {plan['activations_GiB']:.1f}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    reason = qlora.four_bit_unavailable(device, dtype)
    if reason is not None:
        print(f"gpu_qlora_40b: {reason}", file=sys.stderr)
        return 2
    config = model_config(args)
    spec = qlora.quant_spec("nf4", True, dtype)
    start = time.perf_counter()
    model = build_4bit_model(config, spec, dtype, device)
    model.qlora_spec = spec
    if device.type == "cuda":
        print(f"[build] {time.perf_counter() - start:.0f} s, {torch.cuda.memory_allocated() / GiB:.1f} GiB allocated",
              flush=True)
        torch.cuda.reset_peak_memory_stats()
    losses, times = train(model, config, args, device, bf16=dtype == torch.bfloat16)
    out = report(args, config, losses, times, device)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "qlora_40b.json").write_text(json.dumps(out, indent=2) + "\n")
    failures = []
    if out.get("peak_allocated_GiB", 0.0) > args.max_peak_gib:
        failures.append(f"peak allocated {out['peak_allocated_GiB']:.1f} GiB > {args.max_peak_gib} GiB")
    k = min(5, len(losses) // 2)
    if k == 0 or not sum(losses[-k:]) / k < sum(losses[:k]) / k:
        failures.append(f"loss did not fall: first {losses[:k]}, last {losses[-k:]}")
    for failure in failures:
        print(f"gpu_qlora_40b: FAIL: {failure}", file=sys.stderr)
    print("gpu_qlora_40b: OK" if not failures else "gpu_qlora_40b: FAILED", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
