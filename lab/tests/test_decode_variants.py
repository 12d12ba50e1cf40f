"""The lab's decode variants (lab/decode_variants.py) on the CPU: the "math" and "flex" attentions equal SDPA, the
packed step with them gives transformers' greedy tokens, flex runs in the model's own forward through the attention
interface, the explicit options override the product's rules, and the product's DecodeConfig refuses them while
LabDecodeConfig routes them to LabGreedyDecoder."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from internvl.model import DecodeConfig
from internvl.model import fast_generate as fg
from internvl.testing.helpers import decode_prompts, greedy_reference
from lab import decode_variants as dv
from lab.decode_variants import LabDecodeConfig, LabGreedyDecoder, flex_gqa_decode_attention, math_gqa_decode_attention


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


_prompts = decode_prompts
_reference = greedy_reference


@pytest.mark.parametrize("attention", [math_gqa_decode_attention, flex_gqa_decode_attention], ids=["math", "flex"])
def test_decode_attention_equals_sdpa(attention):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(3, 8, 1, 16, generator=g)
    k = torch.randn(3, 2, 32, 16, generator=g)
    v = torch.randn(3, 2, 32, 16, generator=g)
    mask = torch.rand(3, 1, 1, 32, generator=g) > 0.3
    mask[..., 0] = True
    out = attention(q, k, v, mask, 0.25)
    rep = lambda t: t.repeat_interleave(4, dim=1)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask, scale=0.25)
    assert out.shape == (3, 1, 8, 16)
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-5)


@pytest.mark.parametrize("attention", ["math", "flex"])
def test_packed_step_with_lab_attention_matches_plain_generate(attention):
    lm = _llama()
    emb, mask = _prompts()
    dec = fg.decoder_for(lm, LabDecodeConfig(backend=None, attention=attention))
    assert isinstance(dec, LabGreedyDecoder)
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=12), _reference(lm, emb, mask, 12))
    assert dec._pack_signature is not None, "the packed step was not used"


def test_flex_attention_in_the_models_own_forward_matches_plain_generate(monkeypatch):
    """packed=False: the model's own forward runs, the decode attention goes through the registered flex interface
    (the prefill keeps SDPA); the attention implementation is restored afterwards."""
    calls = []
    real = dv.flex_gqa_decode_attention
    monkeypatch.setattr(dv, "flex_gqa_decode_attention", lambda *a: calls.append(1) or real(*a))
    lm = _llama(seed=12)
    emb, mask = _prompts(seed=12)
    ref = _reference(lm, emb, mask, 10)
    dec = LabGreedyDecoder(lm, LabDecodeConfig(backend=None, packed=False, attention="flex"))
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=10), ref)
    assert len(calls) == 9 * lm.config.num_hidden_layers  # every decode step, every layer; not the prefill
    assert dec._pack_signature is None
    assert lm.config._attn_implementation == "sdpa"


def test_configs_route_variants():
    with pytest.raises(TypeError):
        DecodeConfig(attention="math")
    for bad in ({"attention": "flash"}, {"backend": "xla"}, {"gemv": "yes"}, {"packed": "yes"},
                {"compile_scope": "model"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LabDecodeConfig(**bad)
    lm = _llama(seed=3)
    plain = fg.decoder_for(lm, DecodeConfig())
    lab = fg.decoder_for(lm, LabDecodeConfig())  # the same rules, another class: another decoder
    assert type(plain) is fg.StaticGreedyDecoder and type(lab) is LabGreedyDecoder
    config = LabDecodeConfig(packed=False, attention="sdpa", tuning=False, backend=None)
    assert fg.decoder_for(lm, config) is fg.decoder_for(lm, LabDecodeConfig(packed=False, attention="sdpa",
                                                                           tuning=False, backend=None))


def test_explicit_options_override_the_product_rules():
    """packed / tuning / gemv / compile_scope values other than "auto" replace the product's rule (the benchmark's
    variants); packed=False leaves the weights where they were."""
    lm = _llama(seed=11)
    assert LabGreedyDecoder(lm, LabDecodeConfig(backend="inductor", tuning=False))._packed_step(1)
    assert not LabGreedyDecoder(lm, LabDecodeConfig(backend="inductor"))._packed_step(1)  # the product's rule
    off = LabGreedyDecoder(lm, LabDecodeConfig(backend=None, packed=False))
    assert not off._packed_step(4) and off._attention() == "sdpa" and not off._gemv_on()
    assert LabGreedyDecoder(lm, LabDecodeConfig(backend="eager", compile_scope="layer"))._layer_scope()
    assert not LabGreedyDecoder(lm, LabDecodeConfig(backend=None, compile_scope="layer"))._layer_scope()
    assert not LabGreedyDecoder(lm, LabDecodeConfig(compile_scope="step"))._layer_scope()
    storages = {id(p): p.untyped_storage().data_ptr() for p in lm.parameters()}
    emb, mask = _prompts(seed=8)
    assert torch.equal(off.generate(emb, mask, max_new_tokens=5), _reference(lm, emb, mask, 5))
    assert {id(p): p.untyped_storage().data_ptr() for p in lm.parameters()} == storages
    assert off._pack_signature is None
