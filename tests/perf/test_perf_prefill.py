"""Guards for the decoder's time-to-first-token path: the prefill attends over the prompt only (the prefix of the
static cache, as transformers' dynamic cache does), fills the static cache as the whole-cache prefill did, gives the
same first-token logits as the plain forward, and later calls reuse the packed weights without walking the model."""
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from internvl.model import DecodeConfig
from internvl.model import fast_generate as fg
from internvl.model.fast_generate import StaticGreedyDecoder, prefix_cache


@pytest.fixture()
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _prompt(batch: int, length: int, pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, 32, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :pad] = 0
    return emb, mask


@pytest.mark.parametrize("pad", [0, 3])
def test_prefill_attends_over_the_prompt_only(lm, monkeypatch, pad):
    """The prefill's attention sees keys of the prompt's length (not the 256-rounded cache) and, unpadded, no mask
    (so SDPA can take its causal flash kernel); the first token's logits match the plain dynamic-cache forward."""
    seen = []
    inner = fg.sdpa_gqa_decode_attention

    def spy(module, query, key, value, attention_mask, **kw):
        if query.shape[2] > 1:
            seen.append((key.shape[2], None if attention_mask is None else tuple(attention_mask.shape)))
        return inner(module, query, key, value, attention_mask, **kw)

    monkeypatch.setattr(fg, "sdpa_gqa_decode_attention", spy)
    emb, mask = _prompt(2, 9, pad=pad)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    fg.register_decode_attention(fg.DECODE_ATTN, spy)
    try:
        out = dec.generate(emb, mask, max_new_tokens=1)
    finally:
        fg.register_decode_attention(fg.DECODE_ATTN, inner)
    assert seen and all(length == 9 for length, _ in seen)
    assert all(shape is None for _, shape in seen) if not pad else all(shape[-1] == 9 for _, shape in seen)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref = lm(inputs_embeds=emb, attention_mask=mask if pad else None, position_ids=positions,
             cache=DynamicCache(config=lm.config), use_cache=True).logits[:, -1]
    assert torch.equal(out[:, 0], ref.argmax(-1))


def test_prefix_cache_fills_the_static_cache_like_the_whole_cache_prefill(lm):
    """Keys/values written through the prefix view equal those of a prefill over the whole static cache, the
    cache's length advances to the prompt's, and the logits agree (fp32, max abs diff <= 1e-5)."""
    emb, _ = _prompt(1, 7, seed=1)
    positions = torch.arange(7)[None]
    whole = fg.StaticCache(config=lm.config, max_cache_len=256)
    a = lm(inputs_embeds=emb, position_ids=positions, cache=whole, use_cache=True).logits[:, -1]
    static = fg.StaticCache(config=lm.config, max_cache_len=256)
    b = lm(inputs_embeds=emb, position_ids=positions, cache=prefix_cache(static, 7), use_cache=True).logits[:, -1]
    assert (a - b).abs().max() <= 1e-5
    for x, y in zip(whole.layers, static.layers):
        assert int(y.cumulative_length) == 7 and y.keys.shape[2] == 256
        assert torch.allclose(x.keys, y.keys, atol=1e-6) and torch.allclose(x.values, y.values, atol=1e-6)


def test_repeat_calls_skip_repacking_until_a_weight_moves(lm, monkeypatch):
    """After the first call, `pack_decoder` (a walk over every layer) is not run again while the packed layout is in
    place; re-pointing one weight makes the decoder pack again, and the tokens stay those of the first call."""
    calls = []
    real = fg.pack_decoder
    monkeypatch.setattr(fg, "pack_decoder", lambda m: calls.append(1) or real(m))
    emb, mask = _prompt(1, 6, seed=2)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    first = dec.generate(emb, mask, max_new_tokens=4)
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=4), first) and len(calls) == 1
    q = lm.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        q.weight.data = q.weight.data.clone()  # same values, a new address: the packed layout is gone
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=4), first) and len(calls) == 2
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=4), first) and len(calls) == 2


def test_reset_cache_zeroes_like_cache_reset(lm):
    """`reset_cache` (one multi-tensor zeroing) leaves the cache as `StaticCache.reset` does: keys, values and the
    lengths zero; a cache with uninitialised layers goes through `reset` itself."""
    emb, _ = _prompt(1, 5, seed=3)
    cache = fg.StaticCache(config=lm.config, max_cache_len=256)
    fg.reset_cache(cache)  # nothing initialised yet: cache.reset()
    lm(inputs_embeds=emb, position_ids=torch.arange(5)[None], cache=cache, use_cache=True)
    assert all(int(layer.cumulative_length) == 5 and layer.keys.abs().sum() > 0 for layer in cache.layers)
    fg.reset_cache(cache)
    for layer in cache.layers:
        assert int(layer.cumulative_length) == 0 and not layer.keys.any() and not layer.values.any()
