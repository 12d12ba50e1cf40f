"""Per-GPU memory plan for fine-tuning an InternVL-Chat preset with DeepSpeed ZeRO-3, bf16 and gradient checkpointing.

    python -m lab.memory_plan                                 # MedRegA 40B, LoRA r16 + full, 8 and 16 GPUs
    python -m lab.memory_plan --preset mid --gpus 1 --micro_batch 1 --seq 1024

Model states come from DeepSpeed's ZeRO-3 estimator (`estimate_zero3_model_states_mem_needs`) applied to the trainable
parameters (18 bytes/param partitioned over all GPUs, plus the largest layer gathered); frozen parameters cost 2
bytes/param (bf16), partitioned too. Activations per micro-batch sample, checkpointing every LLM layer: one bf16
hidden state per layer; one layer's recompute working set, seq x (8 hidden + 2 kv_dim + 4 intermediate) x 2 bytes;
logits and loss, seq x vocab x 10 bytes; a trainable ViT adds its own checkpoints. Every run also prints QLoRA rows
(`qlora_row`). Parameter counts come from building the preset on the meta device.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from dataclasses import dataclass

from torch import nn

from internvl.offline import enforce_offline

GiB = 1024**3


@dataclass
class ParamCounts:
    """Parameter counts of a preset, by part, plus the largest single module (gathered whole under ZeRO-3)."""

    vision: int
    mlp: int
    llm: int
    lora_llm: int
    largest_layer: int
    llm_linear: int = 0  # LLM nn.Linear weights except the LM head: what QLoRA stores in 4 bit
    largest_linear: int = 0  # the biggest of those (dequantised to bf16 while it computes)

    @property
    def total(self) -> int:
        return self.vision + self.mlp + self.llm


def count_params(preset: str, lora_rank: int, vocab: int | None = None, layers: int | None = None,
                 vit_layers: int | None = None) -> tuple[ParamCounts, object]:
    """Build `preset` on the meta device and count parameters (LoRA: r x (in + out) per target Linear); `vocab`,
    `layers`, `vit_layers` override the LLM vocabulary and the LLM / ViT depth."""
    from internvl.model import build_on_meta, count_parameters, load_preset
    from internvl.train.lora import llm_lora_targets

    config = load_preset(preset)
    if vocab is not None:
        config.llm_config.vocab_size = vocab
    if layers is not None:
        config.llm_config.num_hidden_layers = layers
    if vit_layers is not None:
        config.vision_config.num_hidden_layers = vit_layers
    model = build_on_meta(config)
    parts = count_parameters(model)
    targets = llm_lora_targets(model.language_model)
    lora = 0
    for name, module in model.language_model.named_modules():
        if isinstance(module, nn.Linear) and any(name.endswith(t) for t in targets):
            lora += lora_rank * (module.in_features + module.out_features)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head = model.language_model.get_output_embeddings()
    linears = [m.weight.numel() for m in model.language_model.modules() if isinstance(m, nn.Linear) and m is not head]
    return ParamCounts(vision=parts["vision_model"], mlp=parts["mlp1"], llm=parts["language_model"], lora_llm=lora,
                       largest_layer=largest, llm_linear=sum(linears), largest_linear=max(linears, default=0)), config


def activation_bytes(config, seq: int, micro_batch: int, train_vit: bool = False) -> dict[str, float]:
    """Activation estimate (bytes per GPU) for one micro-batch with gradient checkpointing; see module docstring."""
    llm = config.llm_config
    h, layers, inter, vocab = llm.hidden_size, llm.num_hidden_layers, llm.intermediate_size, llm.vocab_size
    kv_dim = h // llm.num_attention_heads * getattr(llm, "num_key_value_heads", llm.num_attention_heads)
    checkpoints = layers * seq * h * 2
    working = seq * (8 * h + 2 * kv_dim + 4 * inter) * 2
    logits = seq * vocab * (2 + 4 + 4)
    vit = 0.0
    if train_vit:
        v = config.vision_config
        tokens = (config.image_size // v.patch_size) ** 2 + 1
        vit = v.num_hidden_layers * tokens * v.hidden_size * 2 + tokens * (8 * v.hidden_size + 4 * v.intermediate_size) * 2
    return {"checkpoints": micro_batch * checkpoints, "layer_recompute": micro_batch * working,
            "logits_loss": micro_batch * logits, "vit": micro_batch * vit}


def plan_row(counts: ParamCounts, config, mode: str, gpus: int, gpus_per_node: int, seq: int, micro_batch: int,
             offload: bool = False) -> dict[str, float]:
    """Memory (GiB per GPU) of one configuration. mode: 'lora' (LLM LoRA, rest frozen) or 'full' (LLM trained,
    ViT + projector frozen, the released MedRegA recipe)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    if mode == "lora":
        trainable, frozen = counts.lora_llm, counts.total
    elif mode == "full":
        trainable, frozen = counts.llm, counts.vision + counts.mlp
    else:
        raise ValueError(f"unknown mode {mode!r}")
    nodes = max(gpus // gpus_per_node, 1)
    per_node = min(gpus, gpus_per_node)
    cpu_states, gpu_states, _largest = estimate_zero3_model_states_mem_needs(
        total_params=trainable, largest_layer_params=counts.largest_layer, num_gpus_per_node=per_node,
        num_nodes=nodes, cpu_offload=offload, cpu_offload_params=offload, zero_init=True)
    frozen_bytes = 0 if offload else 2 * frozen / gpus
    cpu_bytes = cpu_states + (2 * frozen / nodes if offload else 0)
    acts = activation_bytes(config, seq, micro_batch)
    total = gpu_states + frozen_bytes + sum(acts.values())
    return {"mode": mode, "gpus": gpus, "trainable_B": trainable / 1e9, "states_GiB": gpu_states / GiB,
            "frozen_GiB": frozen_bytes / GiB, "activations_GiB": sum(acts.values()) / GiB,
            "logits_GiB": acts["logits_loss"] / GiB, "total_GiB": total / GiB, "cpu_GiB_per_node": cpu_bytes / GiB}


#: Bytes per 4-bit weight: 0.5 for the NF4 codes plus the block scales (blocks of 64): fp32 per block (4/64), or with
#: double quantisation 8 bit per block and an fp32 per 256 blocks (1/64 + 4/(64*256)).
NF4_BYTES = {False: 0.5 + 4 / 64, True: 0.5 + 1 / 64 + 4 / (64 * 256)}


def qlora_row(counts: ParamCounts, config, seq: int, micro_batch: int, double_quant: bool = True,
              lora_dropout: bool = True) -> dict[str, float]:
    """Memory (GiB) of QLoRA on one GPU without DeepSpeed (`--load_in_4bit`): 4-bit LLM linears (`NF4_BYTES`), bf16
    for the rest; LoRA fp32 weight + grad + Adam m, v = 16 bytes per adapter parameter; `activation_bytes` plus the
    inputs LoRA keeps per recomputed layer (a bf16 dropout output and its bool mask per target, 6 x hidden + MLP
    width) and two bf16 copies of the largest dequantised linear. CUDA context and allocator slack are not in it."""
    llm = config.llm_config
    frozen_16 = counts.total - counts.llm_linear
    weights = NF4_BYTES[double_quant] * counts.llm_linear + 2 * frozen_16
    states = 16 * counts.lora_llm
    acts = activation_bytes(config, seq, micro_batch)
    lora_inputs = micro_batch * seq * (6 * llm.hidden_size + llm.intermediate_size) * (3 if lora_dropout else 0)
    dequant = 2 * 2 * counts.largest_linear
    total = weights + states + sum(acts.values()) + lora_inputs + dequant
    return {"mode": "qlora", "gpus": 1, "trainable_B": counts.lora_llm / 1e9, "states_GiB": states / GiB,
            "frozen_GiB": weights / GiB, "activations_GiB": (sum(acts.values()) + lora_inputs + dequant) / GiB,
            "logits_GiB": acts["logits_loss"] / GiB, "total_GiB": total / GiB, "cpu_GiB_per_node": 0.0}


def format_table(rows: list[dict[str, float]], limit_gib: float, count_label: str = "GPUs") -> str:
    """Markdown table of plan rows; `fits` compares with `limit_gib` minus 10% for CUDA context/fragmentation;
    `count_label` heads the "gpus" column."""
    head = (f"| mode | {count_label} | trainable (B) | model states | frozen weights | activations (of which logits) | "
            "total / GPU | fits 80 GB? | CPU RAM / node |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fits = "yes" if r["total_GiB"] <= 0.9 * limit_gib else "no"
        lines.append(f"| {r['mode']} | {r['gpus']} | {r['trainable_B']:.3f} | {r['states_GiB']:.1f} GiB | "
                     f"{r['frozen_GiB']:.1f} GiB | {r['activations_GiB']:.1f} ({r['logits_GiB']:.1f}) GiB | "
                     f"{r['total_GiB']:.1f} GiB | {fits} | {r['cpu_GiB_per_node']:.0f} GiB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    enforce_offline()  # before count_params imports peft (bitsandbytes' CPU backend asks the hub for kernels)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="medrega")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--gpus_per_node", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--lora_rank", type=int, default=16)
    parser.add_argument("--gpu_gib", type=float, default=80 * 1e9 / GiB, help="GPU memory (default 80 GB)")
    parser.add_argument("--offload", action="store_true", help="ZeRO-3 with optimizer+param CPU offload")
    parser.add_argument("--vocab", type=int, default=None, help="LLM vocabulary (default: the preset's)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("deepspeed") is None:  # the ZeRO-3 estimator is DeepSpeed's
        print("lab.memory_plan needs DeepSpeed: pip install -e '.[train]'", file=sys.stderr)
        return 2
    counts, config = count_params(args.preset, args.lora_rank, args.vocab)
    print(f"preset {args.preset}: ViT {counts.vision / 1e9:.2f}B, projector {counts.mlp / 1e9:.3f}B, "
          f"LLM {counts.llm / 1e9:.2f}B, total {counts.total / 1e9:.2f}B; LoRA r={args.lora_rank} on the LLM "
          f"{counts.lora_llm / 1e6:.1f}M; largest layer {counts.largest_layer / 1e6:.0f}M params")
    print(f"ZeRO-3{' + CPU offload' if args.offload else ''}, bf16, gradient checkpointing, seq {args.seq}, "
          f"micro-batch {args.micro_batch}/GPU\n")
    rows = [plan_row(counts, config, mode, g, args.gpus_per_node, args.seq, args.micro_batch, args.offload)
            for mode in ("lora", "full") for g in args.gpus]
    print(format_table(rows, args.gpu_gib))
    print(f"\nQLoRA on one GPU (4-bit NF4 LLM linears with double quantisation, bf16 ViT/projector/embeddings/head, "
          f"LoRA r={args.lora_rank} fp32 + Adam, no DeepSpeed), gradient checkpointing, seq {args.seq}; "
          "'model states' = LoRA weights, grads and Adam, 'frozen weights' = all base weights:\n")
    qrows = [{**qlora_row(counts, config, args.seq, mb), "gpus": mb} for mb in sorted({1, 2, 4, args.micro_batch})]
    print(format_table(qrows, args.gpu_gib, count_label="micro-batch"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
