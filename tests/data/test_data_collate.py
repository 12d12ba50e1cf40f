"""Tests for internvl.data.collate: padding, packing layout, loss weights, and packed == separate forward passes."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from internvl.constants import IGNORE_INDEX
from internvl.data.collate import PackedCollator, pad_collate, token_loss_weights
from internvl.data.encode import encode_conversation


def _item(n: int, n_sup: int, tiles: int = 1, flag: int = 1, start: int = 10) -> dict:
    ids = torch.arange(start, start + n)
    labels = torch.full((n,), IGNORE_INDEX)
    labels[n - n_sup:] = ids[n - n_sup:]
    return {"input_ids": ids, "labels": labels, "pixel_values": torch.full((tiles, 3, 4, 4), float(start)),
            "image_flags": torch.full((tiles,), flag)}


def test_pad_collate_right_padding() -> None:
    items = [_item(3, 1), _item(5, 2, tiles=2, start=20), _item(2, 1, flag=0, start=30)]
    batch = pad_collate(items, pad_token_id=7)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"][0].tolist() == [10, 11, 12, 7, 7]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 12, IGNORE_INDEX, IGNORE_INDEX]
    assert batch["pixel_values"].shape == (4, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [10, 20, 20, 30]
    assert batch["image_flags"].tolist() == [1, 1, 1, 0]
    # a real token with id 0 is not masked (the original derived the mask from ids != 0)
    zero = _item(3, 1, start=0)
    assert pad_collate([zero, _item(4, 1)])["attention_mask"][0].tolist() == [1, 1, 1, 0]
    with pytest.raises(ValueError, match="empty batch"):
        pad_collate([])


def test_packing_layout_positions_and_images() -> None:
    items = [_item(6, 2, start=10), _item(5, 1, tiles=2, start=20), _item(4, 2, flag=0, start=30), _item(7, 3, start=40)]
    packed = PackedCollator(max_packed_tokens=12)(items)
    # first fit in order: row 0 = items 0 + 1 (11 tokens), row 1 = item 2 + item 3 (11 tokens)
    assert packed["input_ids"].shape == (2, 11)
    assert packed["position_ids"][0].tolist() == list(range(6)) + list(range(5))
    assert packed["position_ids"][1].tolist() == list(range(4)) + list(range(7))
    assert "attention_mask" not in packed
    assert packed["pixel_values"][:, 0, 0, 0].tolist() == [10, 20, 20, 30, 40]
    assert packed["image_flags"].tolist() == [1, 1, 1, 0, 1]
    # tile limit forces a new row; padding gets its own restarting positions and ignored labels
    collator = PackedCollator(max_packed_tokens=12, num_images_expected=2)
    assert collator.plan(items) == [[0, 2], [1], [3]]
    limited = collator(items)
    assert limited["input_ids"].shape == (3, 10)
    assert limited["position_ids"][1].tolist() == list(range(5)) + list(range(5))
    assert (limited["labels"][1, 5:] == IGNORE_INDEX).all() and (limited["loss_weight"][1, 5:] == 0).all()
    assert limited["pixel_values"][:, 0, 0, 0].tolist() == [10, 30, 20, 20, 40]  # packed order


@pytest.mark.parametrize("reduction, per_sample", [("token", lambda n: n), ("sample", lambda n: 1.0),
                                                   ("square", lambda n: math.sqrt(n))])
def test_loss_weights_sum_per_sample(reduction, per_sample) -> None:
    items = [_item(6, 2), _item(5, 1, start=20), _item(9, 4, start=30)]
    packed = PackedCollator(max_packed_tokens=100, loss_reduction=reduction)(items)
    w = packed["loss_weight"][0]
    sums = [float(w[0:6].sum()), float(w[6:11].sum()), float(w[11:20].sum())]
    assert sums == pytest.approx([per_sample(2), per_sample(1), per_sample(4)])
    assert ((w > 0) == (packed["labels"][0] != IGNORE_INDEX)).all()
    assert token_loss_weights(torch.full((3,), IGNORE_INDEX), "square").sum() == 0


def test_packed_batch_counts_its_samples() -> None:
    """`num_samples` is the number of samples, not of rows or of position restarts (padding is one of its own)."""
    items = [_item(6, 2, start=10), _item(5, 1, tiles=2, start=20), _item(4, 2, flag=0, start=30), _item(7, 3, start=40)]
    packed = PackedCollator(max_packed_tokens=12, num_images_expected=2)(items)
    assert packed["input_ids"].shape == (3, 10)
    assert int((packed["position_ids"] == 0).sum()) == 4 + 2  # two padding segments restart positions too
    assert packed["num_samples"].dim() == 0 and packed["num_samples"].dtype == torch.long
    assert int(packed["num_samples"]) == 4
    assert int(PackedCollator(max_packed_tokens=12)(items)["num_samples"]) == 4  # 2 rows
    assert "num_samples" not in pad_collate(items)  # padded batches: one sample per row


def test_packing_errors() -> None:
    with pytest.raises(ValueError, match="batch item 0 has 9 tokens > max_packed_tokens 8"):
        PackedCollator(max_packed_tokens=8)([_item(9, 1)])
    bad = _item(4, 4)
    with pytest.raises(ValueError, match="first label is supervised"):
        PackedCollator()([bad])
    with pytest.raises(ValueError, match="loss_reduction"):
        PackedCollator(loss_reduction="mean")


# --------------------------------------------------------------------------- packed == separate (tiny Llama)
def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_gives_the_same_logits_and_losses_as_separate_samples(attn: str) -> None:
    model = _tiny_llama(attn)
    gen = torch.Generator().manual_seed(1)
    items = []
    for n, n_sup in [(7, 3), (5, 2), (11, 4)]:
        ids = torch.randint(1, 120, (n,), generator=gen)
        labels = torch.full((n,), IGNORE_INDEX)
        labels[n - n_sup:] = ids[n - n_sup:]
        items.append({"input_ids": ids, "labels": labels, "pixel_values": torch.zeros(1, 3, 2, 2),
                      "image_flags": torch.zeros(1, dtype=torch.long)})
    packed = PackedCollator(max_packed_tokens=30, loss_reduction="square")(items)
    assert packed["input_ids"].shape == (1, 23)
    with torch.no_grad():
        # use_cache=False: transformers only reads packing from position_ids when no KV cache is built
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                              use_cache=False).logits[0]
        pos = 0
        losses, counts = [], []
        for item in items:
            n = item["input_ids"].shape[0]
            alone = model(input_ids=item["input_ids"][None]).logits[0]
            torch.testing.assert_close(packed_logits[pos:pos + n], alone, atol=1e-5, rtol=1e-5)
            losses.append(F.cross_entropy(alone[:-1], item["labels"][1:], ignore_index=IGNORE_INDEX))
            counts.append(int((item["labels"] != IGNORE_INDEX).sum()))
            pos += n
        # without the packed position_ids the samples would see each other: the check is not vacuous
        leaky = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(leaky[7:12], packed_logits[7:12], atol=1e-3)
    # square-weighted packed loss == sum_i sqrt(n_i) * mean_i / sum_i sqrt(n_i)
    ce = F.cross_entropy(packed_logits[:-1], packed["labels"][0, 1:], ignore_index=IGNORE_INDEX, reduction="none")
    w = packed["loss_weight"][0, 1:]
    packed_loss = (ce * w).sum() / w.sum()
    expected = sum(math.sqrt(c) * loss for c, loss in zip(counts, losses)) / sum(math.sqrt(c) for c in counts)
    torch.testing.assert_close(packed_loss, torch.as_tensor(expected), atol=1e-5, rtol=1e-5)


def test_packed_multimodal_forward_matches_separate(tiny_model, tiny_config, tiny_tokenizer) -> None:
    """The InternVLChatModel path: image features land in the right sample and attention stays inside samples."""
    n_tok = tiny_config.num_image_token
    size = tiny_config.image_size
    gen = torch.Generator().manual_seed(2)
    convs = [
        ([{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "liver"}], 1),
        ([{"from": "human", "value": "What is a CT scan?"}, {"from": "gpt", "value": "A tomography."}], 0),
        ([{"from": "human", "value": "<image>\nWhere?"}, {"from": "gpt", "value": "<ref>heart</ref><box>[[1, 2, 3, 4]]</box>"}], 1),
    ]
    items = []
    for conv, n_img in convs:
        sample = encode_conversation(conv, tiny_tokenizer, num_patches_list=[1] * n_img, num_image_token=n_tok)
        items.append({"input_ids": sample.input_ids, "labels": sample.labels,
                      "pixel_values": torch.randn(1, 3, size, size, generator=gen),
                      "image_flags": torch.tensor([n_img])})
    packed = PackedCollator(max_packed_tokens=1000)(items)
    with torch.no_grad():
        out = tiny_model(pixel_values=packed["pixel_values"], input_ids=packed["input_ids"],
                         position_ids=packed["position_ids"], image_flags=packed["image_flags"]).logits[0]
        pos = 0
        for item in items:
            n = item["input_ids"].shape[0]
            alone = tiny_model(pixel_values=item["pixel_values"], input_ids=item["input_ids"][None],
                               image_flags=item["image_flags"]).logits[0]
            torch.testing.assert_close(out[pos:pos + n], alone, atol=1e-5, rtol=1e-5)
            pos += n
