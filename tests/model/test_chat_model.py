"""InternVLChatModel: keys, image-token merge, loss variants, packing, generation with KV cache, chat/batch_chat."""
import pytest
import torch
import torch.nn.functional as F

from internvl.constants import (
    IGNORE_INDEX,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
)
from internvl.model import (
    ImageTokenMismatchError,
    InternVLChatConfig,
    InternVLChatModel,
)


def _prompt_ids(tokenizer, n_tiles: int, num_image_token: int, text: str = "Where is the liver?") -> torch.Tensor:
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    start = tokenizer.convert_tokens_to_ids(IMG_START_TOKEN)
    end = tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([[start] + [ctx] * (n_tiles * num_image_token) + [end] + body])


def test_state_dict_follows_original_layout(tiny_config):
    keys = set(InternVLChatModel(tiny_config).state_dict())
    assert {"mlp1.0.weight", "mlp1.0.bias", "mlp1.1.weight", "mlp1.1.bias", "mlp1.3.weight", "mlp1.3.bias"} <= keys
    assert "vision_model.embeddings.class_embedding" in keys
    assert "vision_model.encoder.layers.1.attn.qkv.weight" in keys
    assert "language_model.model.embed_tokens.weight" in keys and "language_model.lm_head.weight" in keys
    assert {k.split(".")[0] for k in keys} == {"vision_model", "mlp1", "language_model"}
    model = InternVLChatModel(tiny_config)
    assert model.mlp1[0].normalized_shape == (128,) and model.mlp1[1].out_features == 64
    assert isinstance(model.mlp1[2], torch.nn.GELU) and model.mlp1[2].approximate == "none"
    assert model.num_image_token == 4


def test_builds_from_a_plain_config_dict(tiny_config):
    model = InternVLChatModel(InternVLChatConfig(**tiny_config.to_dict()))
    assert model.language_model.config.vocab_size == tiny_config.llm_config.vocab_size


def test_image_features_replace_context_embeddings_in_order(tiny_model, tiny_tokenizer):
    pixel_values = torch.randn(2, 3, 56, 56)
    ids = torch.cat([_prompt_ids(tiny_tokenizer, 1, 4)] * 2)
    ids[1] = _prompt_ids(tiny_tokenizer, 1, 4, "Where is the heart?")[0, : ids.shape[1]]
    with torch.no_grad():
        merged = tiny_model._embed(ids, pixel_values, None)
        feats = tiny_model.extract_feature(pixel_values)
        plain = tiny_model.get_input_embeddings()(ids)
    mask = ids == tiny_model.img_context_token_id
    torch.testing.assert_close(merged[mask], feats.reshape(-1, feats.shape[-1]))  # tile 0 fills sample 0, ...
    torch.testing.assert_close(merged[~mask], plain[~mask])


def test_v1_features_are_the_v2_grid_transposed(tiny_config):
    pixel_values = torch.randn(3, 3, 56, 56)
    feats = {}
    for version in ("v1", "v2"):
        tiny_config.ps_version = version
        torch.manual_seed(0)
        model = InternVLChatModel(tiny_config).eval()
        with torch.no_grad():
            feats[version] = model.extract_feature(pixel_values)
    v2_grid = feats["v2"].reshape(3, 2, 2, -1)
    torch.testing.assert_close(feats["v1"], v2_grid.transpose(1, 2).reshape(3, 4, -1))
    assert not torch.allclose(feats["v1"], feats["v2"])


def test_count_mismatch_raises_clearly(tiny_model, tiny_tokenizer):
    ids = _prompt_ids(tiny_tokenizer, 1, 4)[:, :-6]
    ids = ids[:, torch.arange(ids.shape[1]) != 2]  # drop one <IMG_CONTEXT>, as truncation would
    with pytest.raises(ImageTokenMismatchError, match="3 <IMG_CONTEXT> tokens.*4 features"):
        tiny_model(pixel_values=torch.randn(1, 3, 56, 56), input_ids=ids)
    with pytest.raises(ImageTokenMismatchError):
        tiny_model(pixel_values=torch.randn(2, 3, 56, 56), input_ids=_prompt_ids(tiny_tokenizer, 1, 4))


def test_missing_img_context_id_raises(tiny_config, tiny_tokenizer):
    model = InternVLChatModel(tiny_config)
    with pytest.raises(ValueError, match="img_context_token_id is not set"):
        model(pixel_values=torch.randn(1, 3, 56, 56), input_ids=_prompt_ids(tiny_tokenizer, 1, 4))


def _labels(ids: torch.Tensor, n_prompt: int) -> torch.Tensor:
    labels = ids.clone()
    labels[:, :n_prompt] = IGNORE_INDEX
    return labels


def test_loss_is_shifted_token_mean(tiny_model, tiny_tokenizer):
    ids = torch.cat([_prompt_ids(tiny_tokenizer, 1, 4)] * 2)
    labels = _labels(ids, 6)
    labels[1, -2:] = IGNORE_INDEX
    out = tiny_model(pixel_values=torch.randn(2, 3, 56, 56), input_ids=ids, labels=labels,
                     image_flags=torch.ones(2, dtype=torch.long))
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.logits.shape == (2, ids.shape[1], tiny_model.config.llm_config.vocab_size)


def test_loss_weight_and_num_items(tiny_model, tiny_tokenizer):
    ids = torch.cat([_prompt_ids(tiny_tokenizer, 1, 4)] * 2)
    labels = _labels(ids, 6)
    pixel_values = torch.randn(2, 3, 56, 56)
    base = tiny_model(pixel_values=pixel_values, input_ids=ids, labels=labels)
    ce = F.cross_entropy(base.logits[:, :-1].reshape(-1, base.logits.shape[-1]), labels[:, 1:].reshape(-1),
                         reduction="none").reshape(2, -1)
    weight = torch.ones_like(ids, dtype=torch.float32)
    weight[1] = 0.25
    weighted = tiny_model(pixel_values=pixel_values, input_ids=ids, labels=labels, loss_weight=weight)
    valid = (labels[:, 1:] != IGNORE_INDEX).float()
    w = weight[:, 1:] * valid
    torch.testing.assert_close(weighted.loss, (ce * w).sum() / w.sum())
    summed = tiny_model(pixel_values=pixel_values, input_ids=ids, labels=labels, num_items_in_batch=7)
    torch.testing.assert_close(summed.loss, ce.sum() / 7)


def test_text_only_dummy_tiles_are_dropped_but_get_gradients(tiny_config, tiny_tokenizer):
    torch.manual_seed(0)
    model = InternVLChatModel(tiny_config).train()
    model.img_context_token_id = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    with_image = _prompt_ids(tiny_tokenizer, 1, 4)
    text_only = tiny_tokenizer("Where is the liver? The liver shows normal size.", add_special_tokens=False,
                               return_tensors="pt")["input_ids"][:, : with_image.shape[1]]
    text_only = F.pad(text_only, (0, with_image.shape[1] - text_only.shape[1]))
    ids = torch.cat([with_image, text_only])
    out = model(pixel_values=torch.randn(2, 3, 56, 56), input_ids=ids, image_flags=torch.tensor([[1], [0]]),
                labels=_labels(ids, 6))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    # an all-text batch still touches the ViT (ZeRO-3 safety) and leaves the text logits unchanged
    model.zero_grad()
    model.eval()
    flagged = model(pixel_values=torch.randn(1, 3, 56, 56), input_ids=text_only, image_flags=torch.tensor([0]))
    plain = model(input_ids=text_only)
    torch.testing.assert_close(flagged.logits, plain.logits)


def test_packed_rows_equal_separate_samples(tiny_model, tiny_tokenizer):
    a = _prompt_ids(tiny_tokenizer, 1, 4, "Where is the liver?")
    b = _prompt_ids(tiny_tokenizer, 1, 4, "Please locate the right lung in this CT scan.")
    pixel_values = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        la = tiny_model(pixel_values=pixel_values[:1], input_ids=a).logits
        lb = tiny_model(pixel_values=pixel_values[1:], input_ids=b).logits
        packed = torch.cat([a, b], 1)
        position_ids = torch.cat([torch.arange(a.shape[1]), torch.arange(b.shape[1])])[None]
        lp = tiny_model(pixel_values=pixel_values, input_ids=packed, position_ids=position_ids).logits
    torch.testing.assert_close(lp[:, : a.shape[1]], la, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp[:, a.shape[1]:], lb, rtol=1e-4, atol=1e-4)


def test_generate_with_kv_cache_matches_greedy_forward_loop(tiny_model, tiny_tokenizer):
    ids = _prompt_ids(tiny_tokenizer, 2, 4)
    pixel_values = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        generated = tiny_model.generate(pixel_values=pixel_values, input_ids=ids, max_new_tokens=6, do_sample=False,
                                        eos_token_id=None, pad_token_id=0)
        assert generated.shape == (1, 6)  # only the new tokens
        current = ids
        for _ in range(6):
            logits = tiny_model(pixel_values=pixel_values, input_ids=current).logits
            current = torch.cat([current, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert generated[0].tolist() == current[0, ids.shape[1]:].tolist()


def test_generate_needs_context_tokens(tiny_model, tiny_tokenizer):
    ids = tiny_tokenizer("no image here", return_tensors="pt")["input_ids"]
    with pytest.raises(ImageTokenMismatchError, match="no <IMG_CONTEXT>"):
        tiny_model.generate(pixel_values=torch.randn(1, 3, 56, 56), input_ids=ids, max_new_tokens=2)


GEN = dict(max_new_tokens=6, do_sample=False)


def test_chat_prompt_and_history(tiny_model, tiny_tokenizer, monkeypatch):
    seen = {}
    original = tiny_model.generate

    def spy(**kwargs):
        seen["ids"], seen["eos"] = kwargs["input_ids"], kwargs["eos_token_id"]
        return original(**kwargs)

    monkeypatch.setattr(tiny_model, "generate", spy)
    answer, history = tiny_model.chat(tiny_tokenizer, torch.randn(1, 3, 56, 56), "What does this image show?", GEN,
                                      return_history=True)
    prompt = tiny_tokenizer.decode(seen["ids"][0])
    expected = ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<img>"
                + "<IMG_CONTEXT>" * 4 + "</img>\nWhat does this image show?<|im_end|><|im_start|>assistant\n")
    assert prompt == expected
    assert seen["eos"][0] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert set(seen["eos"]) == {tiny_tokenizer.convert_tokens_to_ids(t)
                                for t in ("<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|im_sep|>")}
    assert isinstance(answer, str) and history == [("<image>\nWhat does this image show?", answer)]
    tiny_model.chat(tiny_tokenizer, torch.randn(1, 3, 56, 56), "And the liver?", GEN, history=history)
    second = tiny_tokenizer.decode(seen["ids"][0])
    assert second.count("<img>") == 1 and second.endswith("And the liver?<|im_end|><|im_start|>assistant\n")
    assert f"<|im_start|>assistant\n{answer}<|im_end|>" in second


def test_chat_with_an_empty_history_list_saves_the_image_placeholder(tiny_model, tiny_tokenizer):
    """The usual loop starts with `history = []`: the saved first question carries the `<image>` its prompt had, so
    the next turn with the same image works."""
    pv = torch.randn(1, 3, 56, 56)
    answer, history = tiny_model.chat(tiny_tokenizer, pv, "describe", GEN, history=[], return_history=True)
    assert history == [("<image>\ndescribe", answer)]
    _, history = tiny_model.chat(tiny_tokenizer, pv, "and the liver?", GEN, history=history, return_history=True)
    assert [q for q, _ in history] == ["<image>\ndescribe", "and the liver?"]


def test_chat_keeps_image_placeholder_position(tiny_model, tiny_tokenizer, monkeypatch):
    seen = {}
    original = tiny_model.generate
    monkeypatch.setattr(tiny_model, "generate", lambda **kw: seen.update(kw) or original(**kw))
    tiny_model.chat(tiny_tokenizer, torch.randn(3, 3, 56, 56), "Please locate the liver. <image> Answer:", GEN)
    prompt = tiny_tokenizer.decode(seen["input_ids"][0])
    assert "user\nPlease locate the liver. <img>" + "<IMG_CONTEXT>" * 12 + "</img> Answer:<|im_end|>" in prompt


def test_batch_chat_equals_single_chats(tiny_model, tiny_tokenizer):
    pixel_values = torch.randn(4, 3, 56, 56)
    questions = ["What does this image show?", "Please locate the right lung in this CT scan and describe it.",
                 "Where is the liver?"]
    side = tiny_tokenizer.padding_side
    batched = tiny_model.batch_chat(tiny_tokenizer, pixel_values, questions, GEN, num_patches_list=[1, 2, 1])
    assert tiny_tokenizer.padding_side == side  # restored after left padding
    singles = [
        tiny_model.chat(tiny_tokenizer, pixel_values[0:1], questions[0], GEN),
        tiny_model.chat(tiny_tokenizer, pixel_values[1:3], questions[1], GEN),
        tiny_model.chat(tiny_tokenizer, pixel_values[3:4], questions[2], GEN),
    ]
    assert batched == singles


def test_batch_chat_with_a_text_only_sample(tiny_model, tiny_tokenizer):
    pixel_values = torch.randn(1, 3, 56, 56)
    batched = tiny_model.batch_chat(tiny_tokenizer, pixel_values, ["Where is the heart?", "Say yes."], GEN,
                                    num_patches_list=[1, 0])
    assert batched[1] == tiny_model.chat(tiny_tokenizer, None, "Say yes.", GEN)
    with pytest.raises(ValueError, match="tiles"):
        tiny_model.batch_chat(tiny_tokenizer, pixel_values, ["a", "b"], GEN, num_patches_list=[1, 1])
    with pytest.raises(NotImplementedError):
        tiny_model.batch_chat(tiny_tokenizer, pixel_values, ["a"], GEN, history=[("q", "a")])


def test_generate_checks_image_token_count_before_the_vision_tower(tiny_model, tiny_tokenizer, monkeypatch):
    """generate reads the counts on the host before queueing any GPU work: a prompt whose <IMG_CONTEXT> tokens do not
    match the tiles raises the same error as the forward's check, without running the vision tower."""
    def no_vision(*args, **kwargs):
        raise AssertionError("the vision tower ran before the count check")

    monkeypatch.setattr(tiny_model, "extract_feature", no_vision)
    ids = _prompt_ids(tiny_tokenizer, 1, 4)
    with pytest.raises(ImageTokenMismatchError, match="4 <IMG_CONTEXT> tokens.*8 features"):
        tiny_model.generate(pixel_values=torch.randn(2, 3, 56, 56), input_ids=ids, max_new_tokens=2)
