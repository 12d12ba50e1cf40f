"""InternViT: exact state-dict keys for both variants, maths against a literal transcription of the original naive
attention path, position-embedding interpolation, select_layer, drop path and gradient checkpointing."""
import pytest
import torch
import torch.nn.functional as F

from internvl.model import InternVisionConfig, InternVisionModel

SIX_B = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=3, image_size=56,
             patch_size=14, qkv_bias=False, qk_normalization=True, norm_type="rms_norm")
THREE_HUNDRED_M = dict(SIX_B, qkv_bias=True, qk_normalization=False, norm_type="layer_norm")


def _model(**kwargs) -> InternVisionModel:
    torch.manual_seed(0)
    model = InternVisionModel(InternVisionConfig(**kwargs)).eval()
    with torch.no_grad():  # make norms, biases and layer scales non-trivial so a wrong formula shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "ls1", "ls2")):
                param.add_(0.2 * torch.randn_like(param))
    return model


def test_state_dict_keys_6b_style():
    keys = set(_model(**SIX_B).state_dict())
    layer = {f"encoder.layers.0.{k}" for k in (
        "attn.qkv.weight", "attn.q_norm.weight", "attn.k_norm.weight", "attn.proj.weight", "attn.proj.bias",
        "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "norm1.weight", "norm2.weight",
        "ls1", "ls2")}
    emb = {"embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
           "embeddings.position_embedding"}
    assert {k for k in keys if k.startswith(("embeddings.", "encoder.layers.0."))} == emb | layer
    assert len(keys) == len(emb) + 3 * len(layer)


def test_state_dict_keys_300m_style():
    keys = set(_model(**THREE_HUNDRED_M).state_dict())
    assert "encoder.layers.0.attn.qkv.bias" in keys and "encoder.layers.0.norm1.bias" in keys
    assert not any("q_norm" in k or "k_norm" in k for k in keys)


def test_shapes_follow_the_original():
    model = _model(**SIX_B)
    sd = model.state_dict()
    assert sd["embeddings.class_embedding"].shape == (1, 1, 32)
    assert sd["embeddings.patch_embedding.weight"].shape == (32, 3, 14, 14)
    assert sd["embeddings.position_embedding"].shape == (1, 17, 32)
    assert sd["encoder.layers.0.attn.qkv.weight"].shape == (96, 32)
    assert torch.equal(InternVisionModel(InternVisionConfig(**SIX_B)).encoder.layers[0].ls1, torch.full((32,), 0.1))


def _rms(x, weight, eps=1e-6):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _reference_forward(model: InternVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The original InternViT forward with its naive attention, written out independently of the module code."""
    cfg = model.config
    emb = model.embeddings
    x = F.conv2d(pixel_values, emb.patch_embedding.weight, emb.patch_embedding.bias, stride=cfg.patch_size)
    b, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([emb.class_embedding.expand(b, 1, -1), x], dim=1) + emb.position_embedding
    heads, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    for layer in model.encoder.layers:
        def norm(mod, t):
            if cfg.norm_type == "rms_norm":
                return _rms(t, mod.weight, cfg.layer_norm_eps)
            return F.layer_norm(t, (c,), mod.weight, mod.bias, cfg.layer_norm_eps)

        y = norm(layer.norm1, x)
        n = y.shape[1]
        qkv = F.linear(y, layer.attn.qkv.weight, layer.attn.qkv.bias).reshape(b, n, 3, heads, d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cfg.qk_normalization:  # RMSNorm over the full width, across heads
            q = _rms(q.transpose(1, 2).flatten(-2, -1), layer.attn.q_norm.weight).view(b, n, heads, d).transpose(1, 2)
            k = _rms(k.transpose(1, 2).flatten(-2, -1), layer.attn.k_norm.weight).view(b, n, heads, d).transpose(1, 2)
        attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(y, layer.attn.proj.weight, layer.attn.proj.bias) * layer.ls1
        y = norm(layer.norm2, x)
        y = F.linear(F.gelu(F.linear(y, layer.mlp.fc1.weight, layer.mlp.fc1.bias)), layer.mlp.fc2.weight, layer.mlp.fc2.bias)
        x = x + y * layer.ls2
    return x


@pytest.mark.parametrize("variant", [SIX_B, THREE_HUNDRED_M], ids=["6b", "300m"])
def test_forward_matches_original_maths(variant):
    model = _model(**variant)
    pixel_values = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = model(pixel_values).last_hidden_state
        ref = _reference_forward(model, pixel_values)
    assert out.shape == (2, 17, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_position_embedding_interpolation_is_fp32_bicubic():
    model = _model(**SIX_B)
    pos = model.embeddings.position_embedding
    grid = pos[:, 1:, :].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid.float(), size=(6, 5), mode="bicubic", align_corners=False)
    expected = expected.reshape(1, 32, 30).permute(0, 2, 1)
    torch.testing.assert_close(model.embeddings._patch_pos_embed(6, 5), expected)
    # at the native grid the stored embedding is used as is (bicubic at scale 1 is the identity)
    native = F.interpolate(grid.float(), size=(4, 4), mode="bicubic", align_corners=False).reshape(1, 32, 16)
    torch.testing.assert_close(model.embeddings._patch_pos_embed(4, 4), native.permute(0, 2, 1))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 84, 70)).last_hidden_state
    assert out.shape == (1, 1 + 6 * 5, 32)


def test_position_embedding_interpolates_bf16_weights_in_fp32():
    model = _model(**SIX_B).to(torch.bfloat16)
    got = model.embeddings._patch_pos_embed(6, 6)
    grid = model.embeddings.position_embedding[:, 1:, :].float().reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).reshape(1, 32, 36).permute(0, 2, 1)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want.to(torch.bfloat16))


def test_layer_output_runs_only_needed_blocks():
    model = _model(**SIX_B)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        states = model(x, output_hidden_states=True).hidden_states
        assert len(states) == 4  # embeddings + 3 blocks
        for select in (-1, -2, -4, 0, 2):
            torch.testing.assert_close(model.layer_output(x, select), states[select])
    calls = []
    hook = model.encoder.layers[2].register_forward_hook(lambda *a: calls.append(1))
    model.layer_output(x, -2)
    hook.remove()
    assert calls == []
    with pytest.raises(ValueError, match="out of range"):
        model.layer_output(x, -5)


def test_drop_path_rates_are_linspace_and_only_in_training():
    model = InternVisionModel(InternVisionConfig(**dict(SIX_B, drop_path_rate=0.4)))
    assert [round(layer.drop_path_rate, 6) for layer in model.encoder.layers] == [0.0, 0.2, 0.4]
    x = torch.randn(8, 3, 56, 56)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, model(x).last_hidden_state)
        model.train()
        torch.manual_seed(1)
        a = model(x).last_hidden_state
        torch.manual_seed(2)
        b = model(x).last_hidden_state
    assert not torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 56, 56)
    grads = []
    for checkpointing in (False, True):
        model = _model(**SIX_B).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.encoder.layers)
        model(x).last_hidden_state.square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
