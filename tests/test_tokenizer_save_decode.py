"""The toolkit's answer-decoding policy (`decode_answer`) and its one tokenizer save path (`save_tokenizer`).

On the bundled model's tokenizer (region tags `special: false`, from added_tokens.json) and the tiny fixture
tokenizer (all nine InternVL tokens `special: true`): answers keep the region tags and lose every other control
token whatever the flags, in `decode_answer` and in `chat`/`batch_chat`; save -> load gives identical ids and
decodings; `add_special_tokens` neither flips flags nor reports tokens that were already there.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from internvl.constants import IM_END_TOKEN
from internvl.regions import Box, Region, parse_regions
from internvl.tokenization import (
    PROBE_TEXTS,
    REGION_TAGS,
    SPECIAL_TOKENS,
    TokenizerError,
    add_special_tokens,
    decode_answer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_behaviour,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "asset" / "medreg-mini-model"
ANSWER = ("<ref>cerebellar brain</ref><box>[[399, 999, 502, 999]]</box>, "
          "<ref>肝脏</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>: 未见明显异常")
GENERATED = ("<img><IMG_CONTEXT></img><|im_start|>" + ANSWER.replace(": ", "<quad></quad>: ") + IM_END_TOKEN
             + "<|endoftext|>trailing text<unk><unk>")


def _flag(tokenizer, token: str) -> bool:
    return next(t.special for t in tokenizer.added_tokens_decoder.values() if t.content == token)


def _mark_tags_special(tokenizer) -> None:
    tokenizer.add_tokens(list(REGION_TAGS), special_tokens=True)
    assert all(_flag(tokenizer, tag) for tag in REGION_TAGS)


def _load_quietly(path: Path):
    """load_tokenizer, asserting transformers logs no warning (e.g. "a model of type `internvl_chat` ...")."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        tokenizer = load_tokenizer(path)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage() for r in records]
    return tokenizer


@pytest.fixture()
def bundled():
    return load_tokenizer(BUNDLED)


@pytest.fixture()
def tiny(tiny_tokenizer_dir):
    return load_tokenizer(tiny_tokenizer_dir)  # a fresh copy: some tests change flags


@pytest.mark.parametrize("which", ["bundled", "bundled_tags_special", "tiny"])
def test_decode_answer_keeps_region_tags_and_drops_control_tokens(request, which) -> None:
    tok = request.getfixturevalue("tiny" if which == "tiny" else "bundled")
    if which == "bundled_tags_special":
        _mark_tags_special(tok)
    ids = tok.encode(GENERATED, add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids).count("<quad>") == 1  # the control tokens really are in the ids
    expected = ANSWER + "trailing text"
    assert decode_answer(tok, ids) == expected
    assert decode_answer(tok, ids, separator=IM_END_TOKEN) == ANSWER  # cut at the template separator (id)
    sep_as_text = tok.encode(ANSWER, add_special_tokens=False) + tok(
        IM_END_TOKEN + "x", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert IM_END_TOKEN not in tok.convert_ids_to_tokens(sep_as_text)  # spelt out in pieces, not the one id
    assert decode_answer(tok, sep_as_text, separator=IM_END_TOKEN) == ANSWER  # ... or where it appears as text
    assert parse_regions(decode_answer(tok, ids, separator=IM_END_TOKEN)) == [
        Region("cerebellar brain", [Box(399, 999, 502, 999)]),
        Region("肝脏", [Box(1, 2, 3, 4), Box(5, 6, 7, 8)])]


def test_tag_flags_differ_between_tokenizers_but_answers_do_not(bundled, tiny) -> None:
    assert not any(_flag(bundled, tag) for tag in REGION_TAGS)  # the bundled tokenizer: tags not special
    assert all(_flag(tiny, tag) for tag in REGION_TAGS)  # InternVL's add_tokens(special_tokens=True): special
    assert "<ref>" in bundled.decode(bundled.encode(ANSWER, add_special_tokens=False), skip_special_tokens=True)
    assert "<ref>" not in tiny.decode(tiny.encode(ANSWER, add_special_tokens=False), skip_special_tokens=True)
    for tok in (bundled, tiny):
        assert decode_answer(tok, tok.encode(ANSWER, add_special_tokens=False)) == ANSWER


def test_add_special_tokens_leaves_present_tokens_and_their_flags(bundled) -> None:
    before = tokenizer_behaviour(bundled)
    assert add_special_tokens(bundled) == 0  # all nine are in added_tokens.json: nothing was added
    assert tokenizer_behaviour(bundled) == before  # and nothing changed (flags included)


@pytest.mark.parametrize("which", ["bundled", "bundled_tags_special", "tiny"])
def test_save_then_load_behaves_identically(request, tmp_path, which) -> None:
    tok = request.getfixturevalue("tiny" if which == "tiny" else "bundled")
    if which == "bundled_tags_special":
        _mark_tags_special(tok)
    out = tmp_path / "saved"
    out.mkdir()
    (out / "config.json").write_text((BUNDLED / "config.json").read_text())  # a model dir, as in a checkpoint
    save_tokenizer(tok, out)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "added_tokens.json",
                 "special_tokens_map.json"):
        assert (out / name).is_file(), name
    added = json.loads((out / "added_tokens.json").read_text())
    assert list(added) == list(SPECIAL_TOKENS)  # the tokens after the SentencePiece vocabulary, as in V1-2
    reloaded = _load_quietly(out)
    before, after = tokenizer_behaviour(tok), tokenizer_behaviour(reloaded)
    assert after == before
    # both skip_special_tokens modes over template tokens, image tokens, region text and Chinese are in the probe
    for piece in ("<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>", "<img>", "<ref>", "</box>", "肝脏"):
        assert any(piece in text for text in PROBE_TEXTS), piece
    # saving the reloaded one again (a checkpoint of a checkpoint) changes nothing
    again = save_tokenizer(reloaded, tmp_path / "again")
    assert tokenizer_behaviour(load_tokenizer(again)) == before


def test_save_without_sentencepiece_source(tmp_path, bundled) -> None:
    first = save_tokenizer(bundled, tmp_path / "first")
    for name in ("tokenizer.model", "added_tokens.json"):
        (first / name).unlink()
    (first / "config.json").write_text((BUNDLED / "config.json").read_text())
    plain = _load_quietly(first)  # tokenizer.json only: no SentencePiece file to carry over
    out = save_tokenizer(plain, tmp_path / "plain")
    assert not (out / "tokenizer.model").exists()
    assert tokenizer_behaviour(_load_quietly(out)) == tokenizer_behaviour(plain) == tokenizer_behaviour(bundled)


def test_save_refuses_a_directory_that_reloads_differently(tmp_path, bundled, monkeypatch) -> None:
    import internvl.tokenization as tokenization

    real_load = tokenization.load_tokenizer

    def load_with_special_tags(path, **kwargs):
        tok = real_load(path, **kwargs)
        _mark_tags_special(tok)  # stands for a file whose flags do not survive the round trip
        return tok

    monkeypatch.setattr(tokenization, "load_tokenizer", load_with_special_tags)
    with pytest.raises(TokenizerError, match=r"does not reload identically: .*added_tokens"):
        save_tokenizer(bundled, tmp_path / "out")


def test_chat_and_batch_chat_answers_follow_the_policy(tiny_model, tiny_tokenizer, monkeypatch) -> None:
    """With the tiny tokenizer the tags are special, so `skip_special_tokens=True` (the original) would drop them;
    chat and batch_chat keep them and cut at `<|im_end|>`. `generate` is scripted to emit a known answer."""
    scripted = tiny_tokenizer.encode(GENERATED, add_special_tokens=False)
    pad = tiny_tokenizer.pad_token_id

    def generate(pixel_values=None, input_ids=None, attention_mask=None, **kwargs):
        rows = input_ids.shape[0]
        return torch.tensor([scripted] * (rows - 1) + [scripted[:-2] + [pad, pad]])[:rows]

    monkeypatch.setattr(tiny_model, "generate", generate)
    pixel_values = torch.randn(2, 3, 56, 56)
    assert tiny_model.chat(tiny_tokenizer, pixel_values[:1], "Where are they?") == ANSWER
    answers = tiny_model.batch_chat(tiny_tokenizer, pixel_values, ["Where?", "哪里？"], num_patches_list=[1, 1])
    assert answers == [ANSWER, ANSWER]
