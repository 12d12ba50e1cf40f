"""FSDP setup of `medrega-train` that depends on the model: the frozen towers are replicated, not sharded.

Under FSDP2 (`ENGINE=fsdp2` of the recipes) every wrapped layer is gathered and cast to bf16 at each unshard; for the
frozen ViT and projector that is pure overhead. Measured on one H100 (lab recipe bench, 2026-12-06, tokens/s over the
path without FSDP): sharded towers Yi-shape full 0.91x / LoRA 0.94x, mid 0.81x / 0.82x; replicated bf16 towers 0.94x /
1.07x and 0.96x / 0.93x, losses within 1.5e-4 (docs/performance.md, "Recipe results"). So replication is the default;
`--fsdp_frozen_towers sharded` keeps the previous behaviour.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from internvl.compat import keep_out_of_fsdp

logger = logging.getLogger("internvl.train")

#: the towers the recipe freezes (`--freeze_backbone`, `--freeze_mlp`), as top-level module names of the model.
FROZEN_TOWERS: tuple[str, ...] = ("vision_model", "mlp1")


@dataclass
class TowerPlacement:
    """What `place_frozen_towers` did (saved in run_config.json): towers kept out of FSDP, layer classes taken off the
    wrap list, tensors cast to bf16, bytes each GPU holds for the replicated towers, why a tower was not replicated."""

    replicated: list[str] = field(default_factory=list)
    unwrapped: list[str] = field(default_factory=list)
    cast_to_bf16: int = 0
    bytes_per_gpu: int = 0
    reason: str = ""


def place_frozen_towers(model: nn.Module, training_args) -> TowerPlacement:
    """Keep the wholly frozen towers (`FROZEN_TOWERS`) out of FSDP, replicated on every rank; call before the Trainer.

    Under FSDP with `--fsdp_frozen_towers replicated` (the default), for each frozen tower: under `--bf16` its
    weights are stored in bf16 (FSDP does not cast what it ignores), and accelerate's FSDP plugin gets it as
    `ignored_modules` and loses the layer classes found only inside it (`InternVisionEncoderLayer`) from its wrap
    list, through this run's plugin arguments (`internvl.compat.keep_out_of_fsdp`). Cost: the towers whole on every
    GPU (InternViT-6B + projector in bf16: about 11.9 GB, against 11.9 GB / N sharded). Logs one line."""
    if not training_args.fsdp:
        return TowerPlacement(reason="FSDP off")
    if getattr(training_args, "fsdp_frozen_towers", "replicated") == "sharded":
        logger.info("FSDP: frozen towers stay sharded (--fsdp_frozen_towers sharded)")
        return TowerPlacement(reason="--fsdp_frozen_towers sharded")
    towers = {n: getattr(model, n) for n in FROZEN_TOWERS if isinstance(getattr(model, n, None), nn.Module)}
    frozen = [n for n, t in towers.items() if not any(p.requires_grad for p in t.parameters())]
    trainable = [n for n in towers if n not in frozen]
    if not frozen:
        logger.info("FSDP: no frozen tower to replicate (trainable: %s); all sharded", ", ".join(trainable) or "-")
        return TowerPlacement(reason=f"trainable: {', '.join(trainable)}" if trainable else "no tower")
    placed = TowerPlacement(replicated=frozen, reason=f"trainable, sharded: {', '.join(trainable)}" if trainable
                            else "")
    if training_args.bf16:
        placed.cast_to_bf16 = _to_bf16([towers[n] for n in frozen])
    placed.unwrapped = keep_out_of_fsdp(training_args, frozen, _classes_only_in(model, frozen))
    placed.bytes_per_gpu = sum(p.numel() * p.element_size() for n in frozen for p in towers[n].parameters())
    logger.info("FSDP: frozen %s replicated on every rank, kept out of FSDP (%d tensors cast to bf16; %.2f GB of "
                "weights per GPU; %s off the wrap list); --fsdp_frozen_towers sharded shards them%s",
                ", ".join(frozen), placed.cast_to_bf16, placed.bytes_per_gpu / 1e9, ", ".join(placed.unwrapped) or "nothing",
                f"; {placed.reason}" if placed.reason else "")
    return placed


def _to_bf16(towers: list[nn.Module]) -> int:
    """Store every parameter of `towers` in bf16; returns the number of tensors cast."""
    cast = 0
    for tower in towers:
        for p in tower.parameters():
            if p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
                cast += 1
    return cast


def _classes_only_in(model: nn.Module, towers: list[str]) -> set[str]:
    """Class names of the modules inside the top-level `towers` that appear nowhere else in `model`."""
    inside = {type(m).__name__ for n in towers for m in getattr(model, n).modules()}
    prefixes = tuple(f"{n}." for n in towers)
    outside = {type(m).__name__ for name, m in model.named_modules()
               if name and name not in towers and not name.startswith(prefixes)}
    outside.add(type(model).__name__)
    return inside - outside

