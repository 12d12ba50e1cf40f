"""The "outside" checkpointing variant of the compiled training layers, which lost to the trainer's default: the bare
layer forward (without transformers' checkpointing wrapper) compiled, and non-reentrant checkpointing wrapped around
it from Python, instead of the checkpoint traced into the compiled graph (`internvl.ops.compile_layers`).

`OutsideCkpt` is a `TrainSpeedups` the benchmark's "outside" case passes; `compile_outside(model, opts)` re-compiles
the layers `apply_train_speedups` compiled in this form.
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from internvl.compat import swap_forward
from internvl.ops.compile_layers import _own_code
from internvl.ops.train_speedups import TrainSpeedups

_COMPILED: dict[tuple, object] = {}


@dataclasses.dataclass
class OutsideCkpt(TrainSpeedups):
    """`TrainSpeedups` whose compiled layers are then re-compiled by `compile_outside`."""


def outside_forward(compiled_inner):
    """A layer forward that wraps non-reentrant checkpointing around the compiled bare forward `compiled_inner`."""

    def forward(self, *args, **kwargs):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if not getattr(self, "_can_checkpoint_with_cache", False):
                for name in ("cache", "layer_past"):
                    if kwargs.get(name) is not None:
                        kwargs[name] = None
            return torch.utils.checkpoint.checkpoint(functools.partial(compiled_inner, self, **kwargs), *args,
                                                     use_reentrant=False)
        return compiled_inner(self, *args, **kwargs)

    return forward


def compile_outside(model: nn.Module, opts: TrainSpeedups) -> int:
    """Give every layer that `apply_train_speedups` compiled the "outside" form (one compiled function per layer
    class, with `opts`' backend, mode and inductor options, as the default it is compared with); returns how many
    layers."""
    count = 0
    for module in model.modules():
        if not module.__dict__.get("_compiled_layer", False):
            continue
        cls = type(module)
        options = opts.compile_options or {}
        key = (cls, opts.backend, opts.compile_mode, tuple(sorted(options.items())))
        if key not in _COMPILED:
            inner = getattr(cls.forward, "__wrapped__", cls.forward)  # the layer's own forward, without checkpointing
            compiled = torch.compile(_own_code(inner, f"{cls.__name__}_forward_outside"), backend=opts.backend,
                                     mode=opts.compile_mode, **({"options": options} if options else {}))
            _COMPILED[key] = outside_forward(compiled)
        swap_forward(module, _COMPILED[key], "_compiled_layer")
        count += 1
    return count
