"""Where a (possibly accelerate-dispatched) module computes."""
from __future__ import annotations

import torch
from torch import nn


def execution_device(module: nn.Module) -> torch.device | None:
    """Device where `module` computes: accelerate's execution device when it is dispatched (its weights may then
    sit on the meta device, offloaded to CPU/disk), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, torch.device) else device
    for param in module.parameters():
        return None if param.device.type == "meta" else param.device
    return None
