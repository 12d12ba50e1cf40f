"""The per-instance kernel swap: plumbing checked on the CPU with the liger kernels replaced by PyTorch equivalents
(the kernels themselves need CUDA + Triton; the GPU benchmark checks the loss there), self-check revert, undo."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from internvl.ops import disable_fast_kernels, enable_fast_kernels
from internvl.ops import fast_kernels as fk


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
