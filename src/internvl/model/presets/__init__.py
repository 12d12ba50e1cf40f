"""Model presets as data: `presets/<name>.json` holds `{"name", "description", "config"}` where `config` is a
released-style `config.json` dict for `InternVLChatConfig`.

Shipped: `internvl-chat-v1-2` and `medrega` (real shapes, ~40.07B parameters), `mid` (300M-like ViT + ~1.1B Llama,
for GPU checks) and `tiny` (CPU tests).  Adding a preset means adding a JSON file.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any

from ..configuration_internvl_chat import InternVLChatConfig

__all__ = ["list_presets", "load_preset", "preset_dict"]


def list_presets() -> list[str]:
    """Names of the shipped presets."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__package__).iterdir() if p.name.endswith(".json"))


def preset_dict(name: str) -> dict[str, Any]:
    """The raw `config` dict of preset `name` (a fresh copy, safe to edit)."""
    source = resources.files(__package__) / f"{name}.json"
    if not source.is_file():
        raise ValueError(f"unknown model preset {name!r}; known: {list_presets()}")
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"internvl/model/presets/{name}.json:{exc.lineno}: invalid JSON: {exc.msg}") from None
    if data.get("name") != name or not isinstance(data.get("config"), dict):
        raise ValueError(f"internvl/model/presets/{name}.json: needs 'name' == {name!r} and a 'config' object")
    return data["config"]


def load_preset(name: str, **overrides: Any) -> InternVLChatConfig:
    """`InternVLChatConfig` of preset `name`; top-level `overrides` replace fields (e.g. `ps_version="v2"`)."""
    config = preset_dict(name)
    config.update(overrides)
    return InternVLChatConfig(**config)
