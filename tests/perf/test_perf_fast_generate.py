"""Guards for the static-cache greedy decoder: same tokens as transformers' plain `generate` (greedy), EOS handling,
and a decode step that dynamo traces with fullgraph=True (no graph breaks, hence no host syncs per token)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv

from internvl.model import DecodeConfig
from internvl.model import fast_generate as fg
from internvl.model.fast_generate import StaticGreedyDecoder, sdpa_gqa_decode_attention


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


def _prompts(batch=3, length=6, hidden=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, hidden, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :2] = 0
    if batch > 1:
        mask[1, :1] = 0
    return emb, mask


def test_matches_plain_generate_without_eos(lm):
    emb, mask = _prompts()
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    out = StaticGreedyDecoder(lm, DecodeConfig(backend=None)).generate(emb, mask, max_new_tokens=12)
    assert torch.equal(out, ref)


def test_matches_plain_generate_with_eos_and_reuse(lm, monkeypatch):
    emb, mask = _prompts(seed=1)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    eos = int(ref[0, 3])  # a token the first row emits: its row must stop there
    ref_eos = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    monkeypatch.setattr(fg, "CHECK_EVERY", 2)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    out = dec.generate(emb, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    width = ref_eos.shape[1]
    assert torch.equal(out[:, :width], ref_eos)
    assert (out[:, width:] == 0).all()
    # a second call reuses the cached state and must not see the first call's cache contents
    again = dec.generate(emb, mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(again, out)


def test_min_new_tokens_suppresses_eos(lm):
    emb, mask = _prompts(seed=2)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    eos = int(ref[0, 0])
    ref_min = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, min_new_tokens=4,
                          do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = StaticGreedyDecoder(lm, DecodeConfig(backend=None)).generate(
        emb, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, min_new_tokens=4
    )
    assert torch.equal(out[:, : ref_min.shape[1]], ref_min)


def test_unpadded_batch_matches_plain_generate(lm):
    emb, _ = _prompts(seed=4)
    mask = torch.ones(emb.shape[:2], dtype=torch.long)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=9, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    out = StaticGreedyDecoder(lm, DecodeConfig(backend=None)).generate(emb, mask, max_new_tokens=9)
    assert torch.equal(out, ref)


def test_decode_step_traces_fullgraph(lm):
    """backend='eager' runs dynamo with fullgraph=True: any data-dependent host code would raise here."""
    emb, mask = _prompts(batch=2, seed=3)
    ref = StaticGreedyDecoder(lm, DecodeConfig(backend=None)).generate(emb, mask, max_new_tokens=5)
    out = StaticGreedyDecoder(lm, DecodeConfig(backend="eager")).generate(emb, mask, max_new_tokens=5)
    assert torch.equal(out, ref)


def test_rejects_right_padding(lm):
    emb, mask = _prompts(batch=1)
    mask = torch.ones_like(mask)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        StaticGreedyDecoder(lm, DecodeConfig(backend=None)).generate(emb, mask, max_new_tokens=3)


def test_grouped_decode_attention_equals_repeat_kv():
    g = torch.Generator().manual_seed(5)
    module = torch.nn.Module()
    module.num_key_value_groups = 4
    q = torch.randn(3, 8, 1, 16, generator=g)
    k = torch.randn(3, 2, 21, 16, generator=g)
    v = torch.randn(3, 2, 21, 16, generator=g)
    mask = torch.rand(3, 1, 1, 21, generator=g) > 0.3
    mask[..., 0] = True
    out, _ = sdpa_gqa_decode_attention(module, q, k, v, mask, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(q, repeat_kv(k, 4), repeat_kv(v, 4), attn_mask=mask,
                                                           scale=0.25).transpose(1, 2)
    assert out.shape == (3, 1, 8, 16)
    assert torch.allclose(out, ref, atol=1e-6)


def test_decoder_for_backend_choice(lm, monkeypatch):
    assert fg.decoder_for(lm).compile_backend == "inductor"  # "auto", small model
    monkeypatch.setattr(fg, "AUTO_INDUCTOR_MAX_PARAMS", 10)
    assert fg.StaticGreedyDecoder(lm, DecodeConfig()).compile_backend == "eager"  # "auto", "large" model
    dec = fg.decoder_for(lm, DecodeConfig(backend=None))
    assert dec.compile_backend is None and fg.decoder_for(lm, DecodeConfig(backend=None)) is dec  # cached
