"""Guards for packed q/k/v and gate/up weights (internvl/ops/packed_projections.py) and the packed decode step of
StaticGreedyDecoder: same greedy tokens as transformers' plain `generate`, re-packing after parameters move, state
dict unchanged, no duplicated memory, fallbacks for LoRA-wrapped and non-Llama models, training after generate."""
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from internvl.model import DecodeConfig, InternVLChatModel, load_preset
from internvl.model import fast_generate as fg
from internvl.model.fast_generate import StaticGreedyDecoder, packed_step_supported
from internvl.ops.packed_projections import (
    decoder_layer_groups,
    layout_ok,
    pack_decoder,
    packable,
)
from internvl.testing.helpers import decode_prompts, greedy_reference


def _llama(seed=0, layers=2, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attn_implementation="sdpa", **kw)
    return LlamaForCausalLM(cfg).eval()


def _qwen2(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256, attn_implementation="sdpa")
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # Qwen2 initialises q/k/v biases to zero: make them matter
        for layer in m.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                lin.bias.normal_(0, 0.5)
    return m


_prompts = decode_prompts
_reference = greedy_reference


def _storages(lm):
    return {id(p): p.untyped_storage().data_ptr() for p in lm.parameters()}


@pytest.mark.parametrize("make", [_llama, _qwen2, lambda: _llama(attention_bias=True, mlp_bias=True)],
                         ids=["llama", "qwen2-bias", "llama-bias"])
@pytest.mark.parametrize("attention", ["sdpa", "triton"])  # triton: the custom op's PyTorch path on the CPU
def test_packed_step_matches_plain_generate(make, attention):
    lm = make()
    emb, mask = _prompts()
    ref = _reference(lm, emb, mask, 12)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    dec._attention = lambda: attention
    out = dec.generate(emb, mask, max_new_tokens=12)
    assert dec._pack_signature is not None, "the packed step was not used"
    assert torch.equal(out, ref)


def test_packed_step_traces_fullgraph():
    lm = _llama(seed=1)
    emb, mask = _prompts(seed=1)
    ref = _reference(lm, emb, mask, 6)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend="eager"))
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=6), ref)
    assert dec._pack_signature is not None


@pytest.mark.parametrize("make", [_llama, _qwen2], ids=["llama", "qwen2-bias"])
def test_layer_compile_scope_compiles_one_layer_for_all(make, monkeypatch):
    """The "layer" compile scope (models above AUTO_INDUCTOR_MAX_PARAMS): the packed step compiles `packed_layer` once (dynamo traces one frame, one graph) and
    X; the tokens equal transformers'
    greedy ones."""
    from torch._dynamo.utils import counters

    lm = make(layers=4)
    torch._dynamo.reset()
    counters.clear()
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend="eager"))
    dec._large = True
    for batch in (3, 2):
        emb, mask = _prompts(batch=batch, seed=batch)
        assert torch.equal(dec.generate(emb, mask, max_new_tokens=6), _reference(lm, emb, mask, 6))
        assert dec._pack_signature is not None and dec._layer_fn is not None
        if batch == 3:
            assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # one layer, 4 calls
    # batch 2 is a new input shape: at most one more graph, never one per layer
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert not StaticGreedyDecoder(lm, DecodeConfig(backend="eager"))._layer_scope()  # a small model
    monkeypatch.setattr(fg, "AUTO_INDUCTOR_MAX_PARAMS", 10)
    auto = StaticGreedyDecoder(lm, DecodeConfig())
    assert auto._layer_scope() and auto._layer_backend() == "inductor" and auto.compile_backend == "eager"
    assert not StaticGreedyDecoder(lm, DecodeConfig(backend=None))._layer_scope()


def test_state_dict_unchanged_and_memory_shared():
    lm = _llama(seed=2)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    params_before = {n: id(p) for n, p in lm.named_parameters()}
    packs = pack_decoder(lm)
    after = lm.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert {n: id(p) for n, p in lm.named_parameters()} == params_before  # same Parameter objects (optimizers, PEFT)
    for layer, (w_qkv, b_qkv, w_gu, b_gu) in zip(lm.model.layers, packs):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        # one storage, exactly as large as the three weights: nothing is duplicated
        assert {w.untyped_storage().data_ptr() for w in qkv} == {w_qkv.untyped_storage().data_ptr()}
        assert w_qkv.untyped_storage().nbytes() == sum(w.numel() * w.element_size() for w in qkv)
        assert torch.equal(w_qkv, torch.cat(qkv))
        assert torch.equal(w_gu, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        assert b_qkv is None and b_gu is None
        # the packed tensor is the parameters' memory: writing a parameter changes the packed view
        with torch.no_grad():
            attn.k_proj.weight[0, 0] += 1.0
        assert w_qkv[attn.q_proj.out_features, 0] == attn.k_proj.weight[0, 0]


def test_repacks_after_parameters_move():
    lm = _llama(seed=3)
    emb, mask = _prompts(seed=3)
    ref = _reference(lm, emb, mask, 9)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=9), ref)
    signature = dec._pack_signature
    groups = decoder_layer_groups(lm)
    lm.to(torch.float64)
    assert not layout_ok(groups[0][0])  # .to() gave every parameter its own storage
    lm.to(torch.float32)
    assert not layout_ok(groups[0][0])
    assert len(dec._states) == 1
    out = dec.generate(emb, mask, max_new_tokens=9)
    assert torch.equal(out, ref)
    assert dec._pack_signature != signature and layout_ok(groups[0][0]) and layout_ok(groups[0][1])
    # a state created before the move was dropped (its graph would read the old addresses), the new one is kept
    assert len(dec._states) == 1
    again = dec.generate(emb, mask, max_new_tokens=9)
    assert torch.equal(again, ref)


def test_load_state_dict_after_packing_updates_packed_weights():
    lm, other = _llama(seed=4), _llama(seed=5)
    emb, mask = _prompts(seed=4)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    dec.generate(emb, mask, max_new_tokens=4)
    signature = dec._pack_signature
    lm.load_state_dict(other.state_dict())  # copies in place into the packed storage
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=8), _reference(other, emb, mask, 8))
    assert dec._pack_signature == signature


def test_training_after_packed_generate():
    """Packing happens under inference_mode; the parameters must stay ordinary tensors that autograd can use."""
    lm = _llama(seed=6)
    emb, mask = _prompts(seed=6)
    StaticGreedyDecoder(lm, DecodeConfig(backend=None)).generate(emb, mask, max_new_tokens=3)
    lm.train()
    ids = torch.randint(0, 96, (2, 5))
    loss = lm(input_ids=ids, labels=ids).loss
    loss.backward()
    assert lm.model.layers[0].self_attn.k_proj.weight.grad is not None
    assert not lm.model.layers[0].self_attn.k_proj.weight.is_inference()


def test_lora_wrapped_model_falls_back():
    peft = pytest.importorskip("peft")
    lm = _llama(seed=7)
    model = peft.get_peft_model(lm, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    base = model.base_model.model
    assert not packed_step_supported(base)
    storages = _storages(base)
    emb, mask = _prompts(seed=7)
    ref = _reference(base, emb, mask, 7)
    dec = StaticGreedyDecoder(base, DecodeConfig(backend=None))
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=7), ref)
    assert dec._pack_signature is None and _storages(base) == storages  # nothing was re-pointed


def test_other_architectures_leave_weights_alone():
    lm = _llama(seed=8)
    storages = _storages(lm)
    emb, mask = _prompts(seed=8)
    lm.config.model_type = "gemma"  # a model type the packed step does not reproduce: the model's own forward runs
    assert not packed_step_supported(lm)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    assert torch.equal(dec.generate(emb, mask, max_new_tokens=5), _reference(lm, emb, mask, 5))
    assert _storages(lm) == storages and dec._pack_signature is None


def test_mixed_or_hooked_linears_are_not_packable():
    assert packable([nn.Linear(8, 4), nn.Linear(8, 4)])
    assert not packable([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    hooked = nn.Linear(8, 4)
    hooked.register_forward_hook(lambda *args: None)
    assert not packable([nn.Linear(8, 4), hooked])


def test_decoder_for_follows_the_config():
    """decoder_for builds the decoder of the config it is given (default: DecodeConfig()) and keeps it while the
    config stays equal; the config refuses values it does not know (the lab's variants live in lab/)."""
    lm = _llama(seed=10)
    dec = fg.decoder_for(lm)
    assert dec.config == DecodeConfig() and dec.config.backend == "auto"
    assert fg.decoder_for(lm, DecodeConfig()) is dec
    dec2 = fg.decoder_for(lm, DecodeConfig(backend=None))
    assert dec2 is not dec and dec2.compile_backend is None
    assert fg.decoder_for(lm, DecodeConfig(backend=None)) is dec2
    with pytest.raises(ValueError, match="backend"):
        DecodeConfig(backend="xla")
    with pytest.raises(TypeError):
        DecodeConfig(attention="sdpa")  # a lab option (lab.decode_variants.LabDecodeConfig)


def test_auto_packing_picks_the_step_per_batch():
    """Without our kernels (here: the CPU) weights are packed, and the packed step runs except where inductor's tuned
    step runs (batch 1): there the model's own forward is used (measured faster on the H200)."""
    lm = _llama(seed=11)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend="inductor"))
    assert not dec._packed_step(1) and dec._packed_step(8) and dec._tuned(1) and not dec._tuned(8)
    assert StaticGreedyDecoder(lm, DecodeConfig(backend="eager"))._packed_step(1)
    # the model's-own-forward step over packed weights: same tokens, weights packed
    emb, mask = _prompts(seed=11)
    dec = StaticGreedyDecoder(lm, DecodeConfig(backend=None))
    dec._packed_step = lambda batch: False  # what "auto" picks for the tuned inductor step (no compile on the CPU)
    out = dec.generate(emb, mask, max_new_tokens=7)
    assert torch.equal(out, _reference(lm, emb, mask, 7))
    assert dec._pack_signature is not None and layout_ok(decoder_layer_groups(lm)[0][0])
    assert all(st.packs is None for st in dec._states.values())


def test_save_pretrained_after_packing_round_trips(tmp_path):
    """Packed parameters share one storage per group: save_pretrained (safetensors) must still write every weight
    once and a reload must give the same state dict (no tensor taken for a tied duplicate and dropped)."""
    torch.manual_seed(0)
    model = InternVLChatModel(load_preset("tiny")).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert pack_decoder(model.language_model) is not None
    model.save_pretrained(tmp_path)
    loaded, info = InternVLChatModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    after = loaded.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
