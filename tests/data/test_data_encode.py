"""Tests for internvl.data.encode: the 11 demo records, prompt orders, masks verified by decoding, length limits."""
from __future__ import annotations

import pytest
from medrega_demo_records import demo_records

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN
from internvl.data.encode import EncodeError, apply_prompt_order, encode_conversation, make_token_length
from internvl.regions import Box, Region, parse_regions

N_TOK = 8  # image tokens per tile in these tests (256 in the real model; the count is a parameter)


def _supervised(tok, sample) -> str:
    ids = [i for i, lab in zip(sample.input_ids.tolist(), sample.labels.tolist()) if lab != IGNORE_INDEX]
    return tok.decode(ids)


def _unsupervised(tok, sample) -> str:
    return tok.decode([i for i, lab in zip(sample.input_ids.tolist(), sample.labels.tolist()) if lab == IGNORE_INDEX])


@pytest.mark.parametrize("record", demo_records(), ids=lambda r: f"demo{r['id']}")
def test_demo_records_tokenize_with_correct_masks(tiny_tokenizer, record) -> None:
    sample = encode_conversation(record["conversations"], tiny_tokenizer, num_patches_list=[1], num_image_token=N_TOK,
                                 where=f"demo.jsonl:{record['id'] + 1}")
    answer = record["conversations"][1]["value"]
    # labels: exactly the answer + <|im_end|>, and they are the last tokens of the sequence
    assert _supervised(tiny_tokenizer, sample) == answer + "<|im_end|>"
    assert sample.labels[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = int((sample.labels != IGNORE_INDEX).nonzero()[0])
    assert (sample.labels[first:] != IGNORE_INDEX).all() and (sample.labels[:first] == IGNORE_INDEX).all()
    assert tiny_tokenizer.decode(sample.input_ids[:first]).endswith("<|im_start|>assistant\n")
    # everything else, including the whole image block, is masked
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert int((sample.input_ids == ctx).sum()) == N_TOK
    assert not (sample.labels == ctx).any()
    lines = [line.strip() for line in record["conversations"][0]["value"].replace("<image>", "").split("\n")]
    assert [line for line in lines if line][-1] in _unsupervised(tiny_tokenizer, sample)
    assert tiny_tokenizer.decode(sample.input_ids) == sample.text


@pytest.mark.parametrize("record", demo_records(), ids=lambda r: f"demo{r['id']}")
def test_demo_answer_boxes_parse(record) -> None:
    answer = record["conversations"][1]["value"]
    regions = parse_regions(answer)
    expected = {
        8: [Region("carotid vessel wall", [Box(365, 293, 416, 598), Box(596, 316, 635, 464)])],
        9: [Region("right lung", [Box(102, 106, 481, 910)]), Region("left lung", [Box(535, 128, 923, 889)])],
        10: [Region("胰腺癌", [Box(661, 528, 743, 599)])],
    }
    assert regions == expected.get(record["id"], [])
    if record["id"] == 7:  # Region-to-Text: the box is in the question
        question = record["conversations"][0]["value"]
        assert parse_regions(question) == [Region("this", [Box(421, 351, 505, 470)])]


def test_train_order_is_byte_exact(tiny_tokenizer) -> None:
    conv = [{"from": "human", "value": "What is present?"}, {"from": "gpt", "value": "heart"}]
    block = "<img>" + "<IMG_CONTEXT>" * N_TOK + "</img>"
    train = encode_conversation(conv, tiny_tokenizer, num_patches_list=[1], num_image_token=N_TOK,
                                base_prompt="You are a helpful medical assistant.")
    assert train.text == ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n" + block
                          + "\nYou are a helpful medical assistant. What is present?<|im_end|>"
                            "<|im_start|>assistant\nheart<|im_end|>")


def test_train_order_moves_inline_placeholder_to_the_front() -> None:
    conv = [{"from": "human", "value": "Base prompt. <image>\nQuestion?"}, {"from": "gpt", "value": "a"}]
    assert apply_prompt_order(conv, 1)[0]["value"] == "<image>\nBase prompt. Question?"
    assert apply_prompt_order(conv, 1, "B")[0]["value"] == "<image>\nB Base prompt. Question?"
    multi = [{"from": "human", "value": "1: <image>\n2: <image>\nSame?"}, {"from": "gpt", "value": "a"}]
    assert apply_prompt_order(multi, 2, "B")[0]["value"] == "B 1: <image>\n2: <image>\nSame?"  # kept in place


def test_multi_turn_supervises_every_answer(tiny_tokenizer) -> None:
    conv = [{"from": "human", "value": "<image>\nWhat organ?"}, {"from": "gpt", "value": "liver"},
            {"from": "human", "value": "Where is it?"},
            {"from": "gpt", "value": "<ref>liver</ref><box>[[100, 200, 500, 600]]</box>"}]
    sample = encode_conversation(conv, tiny_tokenizer, num_patches_list=[1], num_image_token=N_TOK)
    assert sample.supervised_text == "liver<|im_end|><ref>liver</ref><box>[[100, 200, 500, 600]]</box><|im_end|>"
    runs = (sample.labels != IGNORE_INDEX).int().diff().eq(1).sum()
    assert int(runs) == 2  # two separate supervised runs
    assert _supervised(tiny_tokenizer, sample) == sample.supervised_text


def test_text_only_and_multi_image(tiny_tokenizer) -> None:
    conv = [{"from": "human", "value": "What is a CT scan?"}, {"from": "gpt", "value": "An x-ray tomography."}]
    text_only = encode_conversation(conv, tiny_tokenizer)
    assert "<img>" not in text_only.text and text_only.num_patches_list == []
    multi = [{"from": "human", "value": "Image-1: <image>\nImage-2: <image>\nCompare."}, {"from": "gpt", "value": "same"}]
    sample = encode_conversation(multi, tiny_tokenizer, num_patches_list=[2, 1], num_image_token=N_TOK)
    ctx = tiny_tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    assert int((sample.input_ids == ctx).sum()) == 3 * N_TOK
    assert sample.text.index("Image-1: <img>") < sample.text.index("Image-2: <img>")
    with pytest.raises(EncodeError, match=r"f.jsonl:3: 2 <image> placeholder\(s\) for 3 image\(s\)"):
        encode_conversation(multi, tiny_tokenizer, num_patches_list=[1, 1, 1], num_image_token=N_TOK, where="f.jsonl:3")
    with pytest.raises(EncodeError, match="placeholder"):
        encode_conversation([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], tiny_tokenizer)


def test_a_sample_over_the_length_limit_is_an_error_never_cut(tiny_tokenizer) -> None:
    conv = [{"from": "human", "value": "<image>\nDescribe."},
            {"from": "gpt", "value": "The right lung shows no focal consolidation. " * 10}]
    full = encode_conversation(conv, tiny_tokenizer, num_patches_list=[1], num_image_token=N_TOK)
    with pytest.raises(EncodeError, match=rf"a.jsonl:7: {len(full)} tokens > max_length 40"):
        encode_conversation(conv, tiny_tokenizer, num_patches_list=[1], num_image_token=N_TOK, max_length=40,
                            where="a.jsonl:7")
    assert len(encode_conversation(conv, tiny_tokenizer, num_patches_list=[1], num_image_token=N_TOK,
                                   max_length=len(full))) == len(full)  # the limit itself is allowed


def test_internvl2_5_template_masks_the_newline(tiny_tokenizer) -> None:
    conv = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "liver"}]
    sample = encode_conversation(conv, tiny_tokenizer, template="internvl2_5")
    assert sample.text.endswith("liver<|im_end|>\n")
    assert _supervised(tiny_tokenizer, sample) == "liver<|im_end|>"
    assert sample.labels[-1] == IGNORE_INDEX


def test_errors_name_the_record(tiny_tokenizer) -> None:
    with pytest.raises(EncodeError, match="x.jsonl:2: <image> inside supervised text"):
        encode_conversation([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}], tiny_tokenizer,
                            num_patches_list=[1], where="x.jsonl:2")
    with pytest.raises(EncodeError, match="x.jsonl:3: no human turn"):
        encode_conversation([], tiny_tokenizer, where="x.jsonl:3")


def test_token_length_function_matches_encode(tiny_tokenizer) -> None:
    length = make_token_length(tiny_tokenizer, base_prompt="B")
    for record in demo_records()[:4]:
        sample = encode_conversation(record["conversations"], tiny_tokenizer, num_patches_list=[1], base_prompt="B")
        assert length(record) == len(sample)
