"""Fixtures for the model tests: a released-style InternVL-Chat config.json with tiny dimensions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

RELEASED_STYLE_CONFIG = Path(__file__).with_name("released_style_config.json")


@pytest.fixture
def released_style_config() -> dict:
    """A fresh config.json dict laid out like the released InternVL-Chat-V1-2 / MedRegA one (remote-code era), with
    tiny dimensions and the tiny tokenizer's 1,009 ids: `auto_map`, `torch_dtype`, no `ps_version`, no `norm_type` in
    the 6B vision config, the old PretrainedConfig keys transformers 4.3x wrote into both sub-configs, `rope_theta` /
    `rope_scaling` in the Llama config."""
    return json.loads(RELEASED_STYLE_CONFIG.read_text("utf-8"))
