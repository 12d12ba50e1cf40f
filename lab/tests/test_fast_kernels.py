"""The lab's per-instance liger kernel swap (`lab.fast_kernels`): plumbing checked on the CPU with the liger kernels
replaced by PyTorch equivalents (the kernels themselves need CUDA + Triton; the GPU benchmark checks the loss there),
self-check revert, undo, no swap inside compiled layers, and the bench variants `s1` / `padded` applying it."""
import functools

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from internvl.model import InternVLChatModel, load_preset
from internvl.ops.train_speedups import TrainSpeedups, apply_train_speedups
from lab import fast_kernels as fk
from lab.bench import train_bench
from lab.bench.batches import fixed_batch
from lab.fast_kernels import (
    disable_fast_kernels,
    enable_fast_kernels,
    enable_outside_compiled,
)


def _torch_rms(x, weight, eps):
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.fixture()
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def torch_kernels(monkeypatch):
    monkeypatch.setattr(fk, "_liger_rms", _torch_rms)
    monkeypatch.setattr(fk, "_liger_silu_mul", lambda a, b: F.silu(a) * b)
    monkeypatch.setattr(fk, "_liger_rope", lambda q, k, cos, sin: apply_rotary_pos_emb(q, k, cos, sin))


def test_nothing_happens_on_cpu_without_opt_in(lm):
    assert enable_fast_kernels(lm) == {"rms_norm": 0, "swiglu": 0, "rope": 0}


def test_swapped_model_computes_the_same(lm, torch_kernels):
    ids = torch.randint(0, 64, (2, 9))
    labels = ids.clone()
    ref = lm(input_ids=ids, labels=labels)
    counts = enable_fast_kernels(lm, allow_cpu=True)
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 2}
    out = lm(input_ids=ids, labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=1e-5)
    # generation with a cache goes through the swapped attention too
    g1 = lm.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert disable_fast_kernels(lm) == 9
    g2 = lm.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(g1, g2)


def test_a_wrong_kernel_is_reverted(lm, torch_kernels, monkeypatch):
    monkeypatch.setattr(fk, "_liger_silu_mul", lambda a, b: a * b)  # not SiLU
    counts = enable_fast_kernels(lm, allow_cpu=True)
    assert counts["swiglu"] == 0 and counts["rms_norm"] == 5
    mlp = lm.model.layers[0].mlp
    assert "forward" not in vars(mlp)  # class forward restored


@pytest.fixture()
def tiny_chat():
    config = load_preset("tiny")
    config.llm_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = InternVLChatModel(config).train()
    model.img_context_token_id = 1008
    return model


def test_no_swap_inside_compiled_layers(tiny_chat, torch_kernels):
    apply_train_speedups(tiny_chat, TrainSpeedups(backend="aot_eager", fuse_projections=False), allow_cpu=True)
    counts = enable_outside_compiled(tiny_chat, allow_cpu=True)
    assert counts == {"rms_norm": 1, "swiglu": 0, "rope": 0}  # the LLM's final norm: every layer is compiled
    assert "forward" in vars(tiny_chat.language_model.model.norm)
    layers = [m for m in tiny_chat.modules() if getattr(m, "_compiled_layer", False)]
    assert len(layers) == 4 and not any(getattr(m, "_fast_kernel", False) for lay in layers for m in lay.modules())


@pytest.mark.parametrize("variant", ["s1", "padded"])
def test_bench_variants_apply_and_report_the_swaps(tiny_chat, torch_kernels, monkeypatch, variant):
    monkeypatch.setattr(train_bench, "enable_outside_compiled",
                        functools.partial(enable_outside_compiled, allow_cpu=True))
    opts = train_bench.TRAIN_VARIANTS[variant][0]
    batch = fixed_batch(2, 40, vocab=1000, image_token_id=1008, num_image_token=tiny_chat.num_image_token,
                        image_size=56, answer_from=20)
    with torch.no_grad():
        ref = train_bench.ours_loss(tiny_chat, batch, fast=False)
        report = train_bench.set_fast(tiny_chat, True, opts)
        assert report["fast_kernels"] == {"rms_norm": 13, "swiglu": 2, "rope": 2}  # nothing is compiled in these
        fast = train_bench.ours_loss(tiny_chat, batch, fast=True, impl=train_bench.loss_impl(opts))
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    train_bench.set_fast(tiny_chat, False)
    assert not any(getattr(m, "_fast_kernel", False) for m in tiny_chat.modules())
    assert "fast_kernels" not in train_bench.set_fast(tiny_chat, True, TrainSpeedups(backend="aot_eager"))
