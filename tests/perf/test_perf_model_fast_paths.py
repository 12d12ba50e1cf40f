"""The model's fast generate path on the tiny preset (forced on the CPU with "always"): the same greedy answers
from generate / batch_chat as transformers' generate, and a fallback for sampling."""
import pytest
import torch

from internvl.model import DecodeConfig, InternVLChatModel, load_preset
from internvl.model import fast_generate as fg
from internvl.model.decode_config import has_training_compiled_layers
from internvl.ops.compile_layers import compile_layers, uncompile_layers
from internvl.tokenization import resize_embeddings_mean


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = InternVLChatModel(load_preset("tiny")).eval()
    m.img_context_token_id = 1008
    return m


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 1000, (2, 24), generator=g)
    ids[:, 3:7] = 1008
    pix = torch.randn(2, 3, 56, 56, generator=g)
    return ids, None, pix


def test_fast_generate_equals_plain(model):
    ids, _, pix = _batch(seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kw = dict(pixel_values=pix, input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False,
              eos_token_id=[4], pad_token_id=0)
    plain = model.generate(fast_generate=False, **kw)
    model.decode_config = DecodeConfig(backend=None)
    fast = model.generate(fast_generate="always", **kw)
    assert torch.equal(fast, plain)
    # sampling is not the fast path's business: it falls back to transformers' generate
    sampled = model.generate(fast_generate="always", **{**kw, "do_sample": True, "top_k": 5})
    assert sampled.shape[0] == 2


def test_batch_chat_fast_equals_plain(model, tiny_tokenizer):
    resize_embeddings_mean(model, len(tiny_tokenizer))
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    questions = ["Describe the image.", "Where is the heart?"]
    cfg = {"max_new_tokens": 6, "do_sample": False}
    model.fast_generate = False
    plain = model.batch_chat(tiny_tokenizer, pix, questions, generation_config=cfg)
    model.fast_generate = "always"
    model.decode_config = DecodeConfig(backend=None)
    fast = model.batch_chat(tiny_tokenizer, pix, questions, generation_config=cfg)
    assert fast == plain


def test_generate_falls_back_while_training_compiled_layers_are_active(model, monkeypatch):
    """Layers compiled by the training fast paths cannot be traced by the decode step (a generation inside a training
    loop): generate then uses transformers' loop - same tokens - and the fast path again once they are removed."""
    ids, _, pix = _batch(seed=5)
    kw = dict(pixel_values=pix, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
              do_sample=False, eos_token_id=[4], pad_token_id=0)
    plain = model.generate(fast_generate=False, **kw)
    model.decode_config = DecodeConfig(backend=None)
    used = []
    real_decoder_for = fg.decoder_for
    monkeypatch.setattr(fg, "decoder_for", lambda lm, config: used.append(1) or real_decoder_for(lm, config))
    compile_layers(model.language_model, backend="eager")
    try:
        assert has_training_compiled_layers(model.language_model)
        assert torch.equal(model.generate(fast_generate="always", **kw), plain)
        assert used == []  # the fast decoder was not used
    finally:
        uncompile_layers(model.language_model)
    assert not has_training_compiled_layers(model.language_model)
    assert torch.equal(model.generate(fast_generate="always", **kw), plain)
    assert used == [1]


def test_the_model_decodes_with_the_measured_default_config(model, monkeypatch):
    """The user's path: `generate` hands the model's own `decode_config` (default `DecodeConfig()`) to the decoder."""
    assert model.decode_config == DecodeConfig()
    seen = []
    real_decoder_for = fg.decoder_for
    monkeypatch.setattr(fg, "decoder_for", lambda lm, config: seen.append(config) or real_decoder_for(lm, config))
    ids, _, pix = _batch(seed=6)
    kw = dict(pixel_values=pix, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
              do_sample=False, eos_token_id=[4], pad_token_id=0)
    plain = model.generate(fast_generate=False, **kw)
    model.decode_config = DecodeConfig(backend=None)
    assert torch.equal(model.generate(fast_generate="always", **kw), plain)
    assert seen == [DecodeConfig(backend=None)]
