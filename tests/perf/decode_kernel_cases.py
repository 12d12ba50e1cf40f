"""Cases for the Triton decode kernels (internvl/ops/decode_kernels.py), run by test_perf_decode_kernels.py in a
subprocess with TRITON_INTERPRET=1 so the Triton code itself executes on the CPU (the interpreter has no bf16
tensor-core products, so fp32 and fp16 are checked here; bf16 is checked on the GPU by the benchmark)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from internvl.model import DecodeConfig
from internvl.model.fast_generate import StaticGreedyDecoder
from internvl.ops import decode_kernels as dk

assert dk.INTERPRETED and dk.triton is not None, "run with TRITON_INTERPRET=1 and triton installed"

TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear_for_every_config(dtype, bias):
    g = torch.Generator().manual_seed(0)
    packed = torch.randn(70, 300, generator=g).to(dtype)  # K not a multiple of any BLOCK_K, N of no BLOCK_N
    weight = packed[13:50]  # a row slice of a packed tensor, as the decode step passes
    b = torch.randn(37, generator=g).to(dtype) if bias else None
    x = torch.randn(1, 1, 300, generator=g).to(dtype)
    ref = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float())
    y = dk.gemv(x, weight, b)
    assert y.shape == (1, 1, 37) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=TOL[dtype], atol=TOL[dtype] * 20)
    for cfg in dk.GEMV_CONFIGS:
        out = torch.empty(37, dtype=dtype)
        dk._launch_gemv(x.reshape(-1), weight, b, out, cfg)
        torch.testing.assert_close(out.float(), ref.reshape(-1), rtol=TOL[dtype], atol=TOL[dtype] * 20,
                                   msg=lambda m, c=cfg: f"config {c}: {m}")


def test_gemv_rejects_more_than_one_row_and_bad_weights():
    with pytest.raises(ValueError, match="one row"):
        dk.gemv(torch.randn(2, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="unit column stride"):
        dk.gemv(torch.randn(1, 8), torch.randn(8, 4).t())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,dim", [(8, 2, 32), (4, 4, 16), (7, 1, 64)], ids=["gqa4", "mha", "g7"])
@pytest.mark.parametrize("length,limit", [(150, 97), (40, 39), (300, 5)], ids=["mid", "full", "early"])
def test_decode_attention_matches_reference(dtype, heads, kv_heads, dim, length, limit):
    g = torch.Generator().manual_seed(length + heads)
    q = torch.randn(2, heads, 1, dim, generator=g).to(dtype)
    k = torch.randn(2, kv_heads, length, dim, generator=g).to(dtype)
    v = torch.randn(2, kv_heads, length, dim, generator=g).to(dtype)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : min(3, limit)] = 0  # left padding of the second row
    lim = torch.tensor([limit])
    out = dk.gqa_decode_attention(q, k, v, mask, lim, dim**-0.5)
    ref = dk.reference_gqa_decode_attention(q.float(), k.float(), v.float(), mask, lim, dim**-0.5)
    assert out.shape == (2, 1, heads, dim) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=TOL[dtype] * 5, atol=TOL[dtype] * 5)


def test_decode_attention_reads_the_cache_through_strides():
    """The static cache's K/V are [B, KVH, L, D] views; a transposed layout (L before KVH) must read the same."""
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 90, 2, 32, generator=g).transpose(1, 2)
    v = torch.randn(1, 90, 2, 32, generator=g).transpose(1, 2)
    q = torch.randn(1, 4, 1, 32, generator=g)
    mask = torch.ones(1, 90, dtype=torch.long)
    lim = torch.tensor([70])
    torch.testing.assert_close(dk.gqa_decode_attention(q, k, v, mask, lim, 0.2),
                               dk.reference_gqa_decode_attention(q, k, v, mask, lim, 0.2), rtol=1e-4, atol=1e-4)


def _llama(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_decoder_with_kernels_matches_plain_generate():
    """The packed decode step with our attention (batch 2 and 1) and GEMV (batch 1): the same greedy tokens as
    transformers' generate; traced by dynamo as one graph with the custom ops in it."""
    lm = _llama(seed=4)
    for batch in (2, 1):
        g = torch.Generator().manual_seed(batch)
        emb = torch.randn(batch, 9, 64, generator=g)
        mask = torch.ones(batch, 9, dtype=torch.long)
        if batch == 2:
            mask[0, :4] = 0
        ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
        dec = StaticGreedyDecoder(lm, DecodeConfig(backend="eager"))  # the interpreter: our kernels, as on a GPU
        assert dec._packed_step(batch) and dec._attention() == "triton" and dec._gemv_on()
        assert torch.equal(dec.generate(emb, mask, max_new_tokens=6), ref)


def test_auto_options_pick_the_kernels_where_they_run():
    """Defaults ("auto") where Triton runs: our attention and the packed step at every batch, our GEMV and no
    coordinate-descent tuning at batch 1; models the kernel does not take (head dim 8) or the packed step does not
    cover keep SDPA and the old batch-1 choice."""
    lm = _llama(seed=5)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend="inductor"))
    assert dec._attention() == "triton" and dec._gemv_on()
    assert dec._packed_step(1) and dec._packed_step(8) and not dec._tuned(1)
    torch.manual_seed(0)
    narrow = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    dec = StaticGreedyDecoder(narrow, DecodeConfig(backend="inductor"))
    dec._gemv_on = lambda: False  # what a device without our GEMV gets
    assert dec._attention() == "sdpa" and dec._tuned(1) and not dec._packed_step(1)


@pytest.mark.parametrize("bias", [False, True])
def test_gemv_int8_matches_dequantised_linear_for_every_config(bias):
    """The dequantising int8 GEMV (weight-only int8: int8 rows, fp32 row scales applied after the sum) equals
    `F.linear` on the dequantised weight, for every block configuration and a row slice of a packed tensor."""
    from internvl.ops.int8_weights import dequantize_int8_rows, quantize_rows

    g = torch.Generator().manual_seed(1)
    q_all, s_all = quantize_rows(torch.randn(70, 300, generator=g))
    weight, scale = q_all[13:50], s_all[13:50]
    b = torch.randn(37, generator=g) if bias else None
    x = torch.randn(1, 1, 300, generator=g)
    ref = torch.nn.functional.linear(x, dequantize_int8_rows(weight, scale, torch.float32), b)
    y = dk.gemv_int8(x, weight, scale, b)
    assert y.shape == (1, 1, 37) and y.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
    for cfg in dk.GEMV_CONFIGS + dk.GEMV_INT8_EXTRA_CONFIGS:
        out = torch.empty(37)
        dk._launch_gemv(x.reshape(-1), weight, b, out, cfg, scale)
        torch.testing.assert_close(out, ref.reshape(-1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows", [2, 5, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_rows_matches_dequantised_linear_for_every_config(rows, bias, monkeypatch):
    """The few-rows int8 product (one read of the int8 weight for all rows, tensor-core blocks, row scales after the
    sum) equals `F.linear` on the dequantised weight for every block configuration, on a row slice of a packed
    tensor, and `int8_linear` routes 2..INT8_ROWS_MAX rows to it."""
    from internvl.ops.int8_weights import dequantize_int8_rows, int8_linear, quantize_rows

    g = torch.Generator().manual_seed(rows)
    q_all, s_all = quantize_rows(torch.randn(90, 300, generator=g))
    weight, scale = q_all[13:80], s_all[13:80]
    b = torch.randn(67, generator=g) if bias else None
    x = torch.randn(rows, 300, generator=g)
    ref = torch.nn.functional.linear(x, dequantize_int8_rows(weight, scale, torch.float32), b)
    for cfg in dk.INT8_ROWS_CONFIGS:
        out = torch.empty(rows, 67)
        dk._launch_int8_rows(x, weight, scale, b, out, cfg)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    launches = []
    launch = dk._launch_int8_rows
    monkeypatch.setattr(dk, "_launch_int8_rows", lambda *a: launches.append(a[-1]) or launch(*a))
    y = int8_linear(x.reshape(rows, 1, 300), weight, scale, b)
    assert y.shape == (rows, 1, 67) and launches == [dk.INT8_ROWS_CONFIGS[0]]  # interpreted: the untimed default
    torch.testing.assert_close(y.reshape(rows, 67), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("scope", ["step", "layer"])
def test_decoder_over_int8_weights_runs_the_int8_gemv_in_the_traced_step(scope):
    """Weight-only int8 language model at batch 1: the packed step (traced by dynamo as one graph, or one traced
    layer reused by every layer) runs the int8 GEMV in the Triton interpreter and gives the int8 model's own greedy
    tokens."""
    from internvl.ops.int8_weights import quantize_int8_weights_

    lm = _llama(seed=6)
    quantize_int8_weights_(lm, skip_modules=())  # the LM head too: every product of the step through the int8 GEMV
    emb = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(1, 9, dtype=torch.long)
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend="eager"))
    dec._large = scope == "layer"  # the "layer" scope of models above AUTO_INDUCTOR_MAX_PARAMS
    assert dec._packed_step(1) and dec._gemv_on() and dec._layer_scope() == (scope == "layer")
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=6), ref)
