"""FSDP setup of `medrega-train` that depends on the model: the frozen towers are replicated, not sharded.

Under FSDP2 (`--fsdp full_shard --fsdp_config src/shell/fsdp2_config.json`, `ENGINE=fsdp2` of the recipes) every
wrapped layer is gathered before its forward and its fp32 weights are cast to bf16 at each unshard. The recipe's
ViT and projector are frozen: sharding them saves memory but costs a gather, a cast and hooks per layer per step.
Measured on one H100 (lab recipe bench, 2026-12-06, one command, 5 timed steps, tokens/s over the path without
FSDP): sharded towers Yi-shape full 0.91x / LoRA 0.94x, mid full 0.81x / LoRA 0.82x; replicated bf16 towers 0.94x /
1.07x and 0.96x / 0.93x, losses within 1.5e-4 of the plain path (docs/performance.md, "Recipe results"). So
replication is the default; `--fsdp_frozen_towers sharded` keeps the previous behaviour.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger("internvl.train")

#: the towers the recipe freezes (`--freeze_backbone`, `--freeze_mlp`), as top-level module names of the model.
FROZEN_TOWERS: tuple[str, ...] = ("vision_model", "mlp1")


@dataclass
class TowerPlacement:
    """What `place_frozen_towers` did: the towers kept out of FSDP (replicated), the layer classes taken off the wrap
    list, how many tensors were cast to bf16, the bytes each GPU holds for the replicated towers, and why nothing
    was done when nothing was (`reason`)."""

    replicated: list[str] = field(default_factory=list)
    unwrapped: list[str] = field(default_factory=list)
    cast: int = 0
    bytes_per_gpu: int = 0
    reason: str = ""

    def as_dict(self) -> dict:
        """JSON-able form (run_config.json)."""
        return {"replicated": self.replicated, "unwrapped": self.unwrapped, "cast_to_bf16": self.cast,
                "bytes_per_gpu": self.bytes_per_gpu, "reason": self.reason}


def place_frozen_towers(model: nn.Module, training_args) -> TowerPlacement:
    """Keep the frozen towers (`FROZEN_TOWERS`) out of FSDP, replicated on every rank; call before the Trainer.

    Applies when FSDP is on (`training_args.fsdp`) and `training_args.fsdp_frozen_towers == "replicated"` (the
    default), to each tower whose every parameter is frozen (a trainable tower stays sharded, as does everything with
    `--fsdp_frozen_towers sharded`):
      - under `--bf16` the tower's weights are stored in bf16, the dtype FSDP2's mixed precision computes in (FSDP
        does not cast parameters it ignores, and the per-step fp32 -> bf16 cast of each unshard goes away);
      - accelerate's FSDP plugin gets the towers as `ignored_modules` (they are moved to the GPU whole, never
        gathered, no hooks) and the layer classes found only inside them (`InternVisionEncoderLayer`) leave its wrap
        list - both through this run's plugin arguments (`internvl.compat.keep_out_of_fsdp`), so nothing leaks into
        another run in the same process.
    Cost: the towers' weights whole on every GPU instead of 1/world_size of them - in bf16 about 11.9 GB for
    InternViT-6B (5.9B parameters) plus the projector, against 11.9 GB / N when sharded (fp32 when not training in
    bf16: twice that). Logs one line; returns what was done."""
    if not training_args.fsdp:
        return TowerPlacement(reason="FSDP off")
    mode = getattr(training_args, "fsdp_frozen_towers", "replicated")
    if mode == "sharded":
        logger.info("FSDP: frozen towers stay sharded (--fsdp_frozen_towers sharded)")
        return TowerPlacement(reason="--fsdp_frozen_towers sharded")
    if mode != "replicated":
        raise ValueError(f"--fsdp_frozen_towers must be replicated or sharded, got {mode!r}")
    towers = {n: getattr(model, n) for n in FROZEN_TOWERS if isinstance(getattr(model, n, None), nn.Module)}
    frozen = [n for n, t in towers.items() if not any(p.requires_grad for p in t.parameters())]
    trainable = [n for n in towers if n not in frozen]
    if not frozen:
        logger.info("FSDP: no frozen tower to replicate (trainable: %s); all sharded", ", ".join(trainable) or "-")
        return TowerPlacement(reason=f"trainable: {', '.join(trainable)}" if trainable else "no tower")
    from internvl.compat import keep_out_of_fsdp

    placed = TowerPlacement(replicated=frozen, reason=f"trainable, sharded: {', '.join(trainable)}" if trainable
                            else "")
    if training_args.bf16:
        placed.cast = _to_bf16([towers[n] for n in frozen])
    placed.unwrapped = keep_out_of_fsdp(training_args, frozen, _classes_only_in(model, frozen))
    placed.bytes_per_gpu = sum(p.numel() * p.element_size() for n in frozen for p in towers[n].parameters())
    logger.info("FSDP: frozen %s replicated on every rank, kept out of FSDP (%d tensors cast to bf16; %.2f GB of "
                "weights per GPU; %s off the wrap list); --fsdp_frozen_towers sharded shards them%s",
                ", ".join(frozen), placed.cast, placed.bytes_per_gpu / 1e9, ", ".join(placed.unwrapped) or "nothing",
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

