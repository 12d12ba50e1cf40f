"""Guards for weight-only int8 (internvl/ops/int8_weights.py): per-row quantisation error bounds, an int8 language
model whose logits stay close to bf16's (fp32 here), the packed decode step over int8 weights giving the tokens of
the int8 model's own forward, and the loader option."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from internvl.model import DecodeConfig
from internvl.model.fast_generate import StaticGreedyDecoder
from internvl.ops.int8_weights import (
    Int8Linear,
    dequantize_int8_rows,
    quantize_int8_weights_,
    quantize_rows,
)
from internvl.ops.packed_projections import layout_ok, pack_decoder, packed_signature

#: int8 with per-row absmax scales rounds each weight by at most half a step (absmax / 254); on this random model the
#: last-position logits move by at most this much relative to their largest magnitude (measured ~0.01).
LOGIT_TOL = 0.05


def _lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_quantize_rows_error_is_half_a_step_per_row():
    w = torch.randn(33, 70) * torch.logspace(-3, 1, 33)[:, None]  # rows of very different magnitudes
    w[5] = 0.0
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and int(q.abs().max()) <= 127
    err = (dequantize_int8_rows(q, scale, torch.float32) - w).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 + 1e-7) and torch.equal(q[5], torch.zeros_like(q[5]))


def test_int8_model_logits_close_to_the_float_model():
    lm = _lm()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = lm(input_ids=ids).logits
        n = quantize_int8_weights_(lm, skip_modules=("lm_head",))
        out = lm(input_ids=ids).logits
    assert n == 2 * 7 and type(lm.lm_head) is nn.Linear
    assert all(type(m) is Int8Linear for m in (lm.model.layers[0].self_attn.q_proj, lm.model.layers[1].mlp.down_proj))
    rel = (out - ref).abs().max() / ref.abs().max()
    assert 0 < rel <= LOGIT_TOL, rel


@pytest.mark.parametrize("batch", [1, 3])
def test_packed_decode_over_int8_weights_matches_the_int8_models_generate(batch):
    lm = _lm(1)
    quantize_int8_weights_(lm, skip_modules=("lm_head",))
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(batch, 7, 64, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    if batch > 1:
        mask[0, :2] = 0
    ref = lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=0)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    out = dec.generate(emb, mask, max_new_tokens=8)
    assert torch.equal(out, ref)
    packs = pack_decoder(lm)
    qkv, _, _, _ = packs[0]
    assert isinstance(qkv, tuple) and qkv[0].dtype == torch.int8 and qkv[1].shape == (64 + 2 * 32,)
    assert layout_ok([lm.model.layers[0].mlp.gate_proj, lm.model.layers[0].mlp.up_proj])
    assert len(packed_signature(packs)) == 2 * 6  # per layer: qkv weight + scale, bias, gate/up weight + scale, bias


def test_int8_linear_is_one_opaque_op_in_a_traced_graph():
    """The int8 product stays one custom op in the graph dynamo hands to its backend, for one row and for several:
    inductor cannot rewrite the multi-row `mm(x, w.to(bf16)) * scale` into its own weight-only-int8 kernel (whose
    CUDA lowering fails on the 40B step at batch 8), and the compiled result equals the eager one."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward

    layer = Int8Linear.from_linear(torch.nn.Linear(24, 10, bias=True))
    for rows in (1, 3):
        x = torch.randn(rows, 1, 24)
        torch._dynamo.reset()
        out = torch.compile(layer, backend=record, fullgraph=True)(x)
        torch.testing.assert_close(out, layer(x))
        assert graphs[-1] == ["internvl.int8_linear.default"], graphs[-1]
