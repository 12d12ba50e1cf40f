"""Tests for internvl.tokenization on the session's tiny SentencePiece tokenizer (the Yi loading path)."""
from __future__ import annotations

import json

import pytest
import torch

from internvl.constants import CHATML_TOKENS, IM_END_TOKEN
from internvl.regions import Box, Region, parse_regions
from internvl.tokenization import (
    SPECIAL_TOKENS,
    TokenizerError,
    add_special_tokens,
    check_single_token_ids,
    load_tokenizer,
    resize_embeddings_mean,
    train_sentencepiece_tokenizer,
)


def test_fixture_is_a_llama_tokenizer_with_single_special_ids(tiny_tokenizer, tiny_tokenizer_dir) -> None:
    from transformers import LlamaTokenizer

    assert isinstance(tiny_tokenizer, LlamaTokenizer)
    assert (tiny_tokenizer_dir / "tokenizer.model").is_file()
    ids = check_single_token_ids(tiny_tokenizer, SPECIAL_TOKENS + CHATML_TOKENS)
    base = json.loads((tiny_tokenizer_dir / "added_tokens.json").read_text())
    assert [ids[t] for t in SPECIAL_TOKENS] == [base[t] for t in SPECIAL_TOKENS]
    assert ids["<img>"] == len(tiny_tokenizer) - len(SPECIAL_TOKENS)  # added after the SentencePiece vocabulary
    assert len(set(ids.values())) == len(ids)
    assert tiny_tokenizer.eos_token == IM_END_TOKEN and tiny_tokenizer.eos_token_id == ids[IM_END_TOKEN]


def test_no_bos_or_eos_is_added(tiny_tokenizer) -> None:
    assert tiny_tokenizer("heart").input_ids == tiny_tokenizer.encode("heart", add_special_tokens=False)
    assert tiny_tokenizer.bos_token_id not in tiny_tokenizer("heart").input_ids


def test_special_tokens_are_not_split_inside_text(tiny_tokenizer) -> None:
    text = "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhere?<|im_end|>"
    pieces = tiny_tokenizer.convert_ids_to_tokens(tiny_tokenizer.encode(text, add_special_tokens=False))
    assert pieces.count("<IMG_CONTEXT>") == 2 and "<img>" in pieces and "</img>" in pieces
    assert pieces[0] == "<|im_start|>" and pieces[-1] == "<|im_end|>"


def test_decode_round_trip_and_skip_special_strips_region_tags(tiny_tokenizer) -> None:
    answer = "<ref>right lung</ref><box>[[102, 106, 481, 910]]</box>, <ref>left lung</ref><box>[[535, 128, 923, 889]]</box>: 未见明显异常"
    ids = tiny_tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == answer + "<|im_end|>"
    stripped = tiny_tokenizer.decode(ids, skip_special_tokens=True)
    assert stripped == "right lung[[102, 106, 481, 910]], left lung[[535, 128, 923, 889]]: 未见明显异常"
    assert parse_regions(stripped) == [Region("right lung", [Box(102, 106, 481, 910)]),
                                       Region("left lung", [Box(535, 128, 923, 889)])]


def test_add_special_tokens_counts_and_is_idempotent(tmp_path) -> None:
    corpus = ["The liver shows a hypodense lesion.", "胰腺癌可能性大。"] * 20
    directory = train_sentencepiece_tokenizer(corpus, tmp_path / "tok", vocab_size=300, extra_special_tokens=())
    tok = load_tokenizer(directory)
    with pytest.raises(TokenizerError, match="not a single token"):
        check_single_token_ids(tok, ["<ref>"])
    before = len(tok)
    assert add_special_tokens(tok) == len(SPECIAL_TOKENS)
    assert len(tok) == before + len(SPECIAL_TOKENS)
    assert add_special_tokens(tok) == 0
    assert tok.decode(tok.encode("<box>x</box>", add_special_tokens=False), skip_special_tokens=True) == "x"


def _tiny_llama(vocab: int, tie: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=tie)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_resize_new_rows_are_the_mean(tie: bool) -> None:
    model = _tiny_llama(50, tie)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings_mean(model, 59) == 9
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape == (59, 16) and new_out.shape == (59, 16)
    torch.testing.assert_close(new_in[:50], old_in)
    torch.testing.assert_close(new_in[50:], old_in.mean(0).expand(9, -1))
    torch.testing.assert_close(new_out[50:], old_out.mean(0).expand(9, -1))
    assert model.config.vocab_size == 59
    assert resize_embeddings_mean(model, 40) == 0  # never shrinks
    assert model(torch.tensor([[58]])).logits.shape == (1, 1, 59)


def test_add_special_tokens_resizes_a_wrapped_model(tmp_path) -> None:
    directory = train_sentencepiece_tokenizer(["heart and lung"] * 30, tmp_path / "tok", vocab_size=290, extra_special_tokens=())
    tok = load_tokenizer(directory)

    class Wrapper(torch.nn.Module):  # stands for InternVLChatModel (LLM in .language_model)
        def __init__(self) -> None:
            super().__init__()
            self.language_model = _tiny_llama(len(tok), tie=False)

    wrapper = Wrapper()
    add_special_tokens(tok, wrapper)
    assert wrapper.language_model.get_input_embeddings().weight.shape[0] == len(tok)


def test_load_tokenizer_errors(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer("OpenGVLab/InternVL-Chat-V1-2")  # hub ids are refused, never downloaded
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json:1: invalid JSON"):
        load_tokenizer(tmp_path / "bad")


def test_train_rejects_empty_corpus(tmp_path) -> None:
    with pytest.raises(TokenizerError, match="no non-empty sentences"):
        train_sentencepiece_tokenizer(["", "  "], tmp_path / "t")
