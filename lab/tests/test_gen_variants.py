"""The benchmark's decode-variant plumbing (lab/bench/gen_bench.py) on the CPU: variant names, the 40B-LLM
timer on the tiny preset, and the variants table."""
import math
from types import SimpleNamespace

import pytest

from internvl.model import DecodeConfig
from lab.decode_variants import LabDecodeConfig
from lab.bench.gen_bench import VARIANTS, apply_variant, parse_variants, real_llm_variants, variant_lines
from lab.bench.runtime import Deadline


def test_parse_and_apply_variants():
    assert parse_variants(" baseline, packed+tuned ,") == ["baseline", "packed+tuned"]
    with pytest.raises(ValueError, match="fused"):
        parse_variants("baseline,fused")
    model = SimpleNamespace(decode_config=DecodeConfig(backend=None))
    apply_variant(model, "packed+tuned+math")
    config = model.decode_config
    assert (config.packed, config.attention, config.tuning, config.backend) == (True, "math", "auto", None)
    assert isinstance(config, LabDecodeConfig)
    assert VARIANTS["baseline"].packed is False and VARIANTS["default"] == DecodeConfig()


def test_real_llm_variants_tiny_cpu():
    rows = real_llm_variants(["baseline", "packed"], new_tokens=4, prompt=12, backend=None, copy_bytes_per_s=1e10,
                             device="cpu", preset="tiny")
    assert [r["variant"] for r in rows] == ["baseline", "packed"]
    assert not [r["error"] for r in rows if "error" in r]
    # per-step time is (full call - one-token call) / steps: on a loaded CPU with 4 tokens it can be <= 0, so only
    # its presence is checked here (timings are the GPU benchmark's business); the call itself took time
    for r in rows:
        assert math.isfinite(r["decode_ms_per_step"]) and r["seconds"] > 0 and r["floor_ms"] > 0, r


def test_variant_lines_ratios_and_skips():
    res = {"decode_weight_bytes": 2e9, "device": {"copy_bytes_per_s": 4e12},
           "gen": [{"case": "ours [baseline]", "variant": "baseline", "batch": 1, "decode_ms_per_step": 2.0,
                    "tokens_per_s": 500.0, "ttft_ms": 30.0, "warmup_s": 20.0},
                   {"case": "ours [packed]", "variant": "packed", "batch": 1, "decode_ms_per_step": 1.0,
                    "tokens_per_s": 990.0, "ttft_ms": 30.0, "warmup_s": 25.0},
                   {"case": "native static + compiled", "batch": 1, "decode_ms_per_step": 3.0,
                    "tokens_per_s": 300.0, "ttft_ms": 30.0, "warmup_s": 25.0}],
           "gen_real_variants": [{"variant": "packed", "error": "RuntimeError('x')"}],
           "gen_skipped": ["ours [tuned] batch 8 (at 231 s)"]}
    text = "\n".join(variant_lines(res))
    assert "2.00x" in text and "50%" in text  # packed: twice the baseline, 0.5 ms floor / 1.0 ms
    assert "native static + compiled 3.000 ms/step" in text and "packed 3.00x" in text
    assert "ERROR" in text and "skipped (time budget): ours [tuned] batch 8" in text


def test_deadline():
    assert not Deadline(None).over()
    assert Deadline(-1).over()
