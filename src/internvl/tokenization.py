"""Tokenizer helpers: InternVL's special tokens, embedding resize, local loading and verified saving, and the one
answer-decoding policy (:func:`decode_answer`: region tags kept, every other control token removed, whatever a
tokenizer file flags ``special``). See docs/foundations.md ("Tokenizer", "Answer decoding policy").
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from internvl.constants import (BOX_END, BOX_START, CHATML_TOKENS, ENDOFTEXT_TOKEN, IM_END_TOKEN, IM_SEP_TOKEN,
                                IM_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN, QUAD_END, QUAD_START,
                                REF_END, REF_START)

__all__ = ["SPECIAL_TOKENS", "REGION_TAGS", "TokenizerError", "add_special_tokens", "decode_answer", "save_tokenizer",
           "tokenizer_behaviour", "PROBE_TEXTS", "resize_embeddings_mean", "load_tokenizer",
           "train_sentencepiece_tokenizer", "check_single_token_ids", "token_id"]

# Order as in the original constants.py (ids follow it when all nine are new).
SPECIAL_TOKENS: tuple[str, ...] = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, QUAD_START, QUAD_END, REF_START,
                                   REF_END, BOX_START, BOX_END)

# The tags answers keep (decode_answer); every other token of SPECIAL_TOKENS is a control token.
REGION_TAGS: tuple[str, ...] = (REF_START, REF_END, BOX_START, BOX_END)

# Control tokens removed from answers even when a tokenizer file does not flag them special.
_CONTROL_TOKENS: tuple[str, ...] = (
    *(tok for tok in SPECIAL_TOKENS if tok not in REGION_TAGS), *CHATML_TOKENS, "<|startoftext|>",
)

_LLAMA_FAMILY = {None, "LlamaTokenizer", "LlamaTokenizerFast", "YiTokenizer", "PreTrainedTokenizerFast"}


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used (missing, remote id, special token not a single id, ...)."""


@torch.no_grad()
def resize_embeddings_mean(model: torch.nn.Module, new_size: int) -> int:
    """Grow the LLM's input (and untied output) embeddings to ``new_size`` rows, new rows = mean of the old rows (the
    original set only the output rows; the mean is deterministic). Never shrinks (checkpoints may pad their
    vocabulary); updates the ``vocab_size`` of the LLM config and ``llm_config``. Returns the rows added."""
    lm = getattr(model, "language_model", None) or model  # InternVLChatModel's LLM, or a plain causal LM
    inp = lm.get_input_embeddings()
    old_size = inp.weight.shape[0]
    if new_size <= old_size:
        return 0
    out = lm.get_output_embeddings()
    tied = out is not None and out.weight is inp.weight
    old_in_mean = inp.weight.float().mean(dim=0)
    old_out_mean = out.weight.float().mean(dim=0) if out is not None and not tied else None
    lm.resize_token_embeddings(new_size, mean_resizing=False)
    inp = lm.get_input_embeddings()
    inp.weight[old_size:] = old_in_mean.to(inp.weight.dtype)
    out = lm.get_output_embeddings()
    if old_out_mean is not None and out is not None:
        out.weight[old_size:] = old_out_mean.to(out.weight.dtype)
    lm.config.vocab_size = new_size
    llm_config = getattr(getattr(model, "config", None), "llm_config", None)
    if llm_config is not None:
        llm_config.vocab_size = new_size
    return new_size - old_size


def add_special_tokens(tokenizer, model: torch.nn.Module | None = None) -> int:
    """Add the :data:`SPECIAL_TOKENS` the tokenizer lacks as special tokens, grow ``model``'s embeddings to match, and
    return how many were new. Present tokens keep their ``special`` flag (re-adding would change what it decodes)."""
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in SPECIAL_TOKENS if tok not in vocab]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    check_single_token_ids(tokenizer, SPECIAL_TOKENS)
    if model is not None:
        resize_embeddings_mean(model, len(tokenizer))
    return int(added)


def check_single_token_ids(tokenizer, tokens: Iterable[str]) -> dict[str, int]:
    """Map each token string to its id, raising :class:`TokenizerError` if one is unknown or splits into several ids."""
    ids: dict[str, int] = {}
    for tok in tokens:
        encoded = tokenizer.encode(tok, add_special_tokens=False)
        if len(encoded) != 1:
            pieces = tokenizer.convert_ids_to_tokens(encoded)
            raise TokenizerError(f"{tok!r} is not a single token in this tokenizer (encodes to {pieces})")
        ids[tok] = encoded[0]
    return ids


def load_tokenizer(path: str | os.PathLike, *, model_max_length: int | None = None):
    """Load a tokenizer from a *local* directory (no hub, no remote code): a SentencePiece ``tokenizer.model`` with a
    Llama-family (or no) ``tokenizer_class`` as ``LlamaTokenizer`` (the Yi path), else the named class or
    ``AutoTokenizer``. :class:`TokenizerError` when the directory is missing or unreadable."""
    from transformers import AutoTokenizer, LlamaTokenizer
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    directory = Path(path)
    if not directory.is_dir():
        raise TokenizerError(f"{directory}: tokenizer directory not found (only local directories are supported)")
    config_file = directory / "tokenizer_config.json"
    tokenizer_class = None
    if config_file.is_file():
        try:
            tokenizer_class = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
        except json.JSONDecodeError as exc:
            raise TokenizerError(f"{config_file}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    kwargs: dict[str, object] = {"local_files_only": True}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    try:
        if (directory / "tokenizer.model").is_file() and tokenizer_class in _LLAMA_FAMILY:
            return LlamaTokenizer.from_pretrained(str(directory), **kwargs)
        # not AutoTokenizer: it would read the model's config.json and warn about the `internvl_chat` model type
        named = tokenizer_class_from_name(tokenizer_class) if tokenizer_class else None
        if named is not None:
            return named.from_pretrained(str(directory), **kwargs)
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise TokenizerError(f"{directory}: cannot load tokenizer: {exc}") from exc


# Texts whose ids and decodings must survive save -> load: template tokens, image tokens, region text (one and several
# objects), Chinese, <quad>, eos.
PROBE_TEXTS: tuple[str, ...] = (
    "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
    "Please locate the brain.<|im_end|><|im_start|>assistant\n",
    "<ref>brain</ref><box>[[230, 130, 802, 999]]</box>",
    "<ref>cerebellar brain</ref><box>[[399, 999, 502, 999]]</box>, <ref>liver</ref><box>[[1, 2, 3, 4], "
    "[5, 6, 7, 8]]</box><|im_end|>",
    "请找出图中的<ref>肝脏</ref><box>[[10, 20, 300, 400]]</box>。<quad>x</quad> The <box>[[0, 0, 999, 999]]</box> "
    "region.<|endoftext|>",
)


def tokenizer_behaviour(tokenizer) -> dict[str, object]:
    """What a tokenizer does, as plain data to compare with ``==``: size, added tokens and their flags, special-token
    map, and per :data:`PROBE_TEXTS` the ids (with and without specials), both decodings and :func:`decode_answer`."""
    per_text = []
    for text in PROBE_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        per_text.append({"text": text, "ids": ids, "ids_with_specials": tokenizer(text)["input_ids"],
                         "decode": tokenizer.decode(ids, skip_special_tokens=False),
                         "decode_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
                         "answer": decode_answer(tokenizer, ids)})
    added = {int(i): (tok.content, bool(tok.special)) for i, tok in tokenizer.added_tokens_decoder.items()}
    return {"size": len(tokenizer), "added_tokens": added, "special_tokens": dict(tokenizer.special_tokens_map),
            "texts": per_text}


def _first_difference(a: object, b: object, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: {a!r} before saving, {b!r} after reloading"


def save_tokenizer(tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write ``tokenizer`` to ``out_dir`` (the toolkit's one way) and return it: ``save_pretrained`` plus the source's
    SentencePiece ``tokenizer.model``, ``added_tokens.json`` and ``special_tokens_map.json``, then a reload that must
    have the same :func:`tokenizer_behaviour`, else :class:`TokenizerError` naming the first difference."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    vocab_file = getattr(tokenizer, "vocab_file", None) or tokenizer.init_kwargs.get("vocab_file")
    if vocab_file and Path(vocab_file).is_file():
        import sentencepiece as spm

        target = out / "tokenizer.model"
        if not (target.is_file() and target.samefile(vocab_file)):
            shutil.copyfile(vocab_file, target)
        base = spm.SentencePieceProcessor(model_file=str(target)).get_piece_size()
        added = {tok.content: int(i) for i, tok in sorted(tokenizer.added_tokens_decoder.items()) if int(i) >= base}
        _write_json(out / "added_tokens.json", added)
    special_map = {key: str(value) for key, value in tokenizer.special_tokens_map.items() if isinstance(value, str)}
    _write_json(out / "special_tokens_map.json", special_map)
    before, after = tokenizer_behaviour(tokenizer), tokenizer_behaviour(load_tokenizer(out))
    if before != after:
        raise TokenizerError(f"{out}: the saved tokenizer does not reload identically: "
                             f"{_first_difference(before, after)}")
    return out


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the tokenizer knows it as one token, else None (the one such check: special-token
    ids for encoding, chat stop ids, the answer decoding policy)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


def _answer_drop_ids(tokenizer) -> set[int]:
    """Ids :func:`decode_answer` removes: every special token and every known control token, except the region tags."""
    drop = set(tokenizer.all_special_ids)
    drop.update(int(i) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    drop.update(i for i in (token_id(tokenizer, tok) for tok in _CONTROL_TOKENS) if i is not None)
    drop.difference_update(i for i in (token_id(tokenizer, tok) for tok in REGION_TAGS) if i is not None)
    return drop


def decode_answer(tokenizer, ids: Iterable[int] | torch.Tensor, *, separator: str | None = None) -> str:
    """Decode generated ``ids`` into the answer users see (chat, batch_chat, ``medrega-eval run``, the demo): region
    tags kept (unambiguous for the parsers), every other special or control token removed, whatever the tokenizer
    file's ``special`` flags; cut before the first ``separator`` (id or text) and stripped."""
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    if separator:
        sep_id = token_id(tokenizer, separator)
        if sep_id is not None and sep_id in ids:
            ids = ids[: ids.index(sep_id)]
    drop = _answer_drop_ids(tokenizer)
    text = tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)
    if separator:
        text = text.split(separator)[0]
    return text.strip()


def train_sentencepiece_tokenizer(sentences: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000, *,
                                  model_max_length: int = 4096,
                                  extra_special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Path:
    """Train a Yi-like byte-fallback SentencePiece tokenizer on ``sentences`` into ``out_dir`` (for test fixtures and
    the bundled tiny model): ids 0/1/2 ``<unk>``/``<|startoftext|>``/``<|endoftext|>``, the ChatML pieces as
    user-defined symbols, ``extra_special_tokens`` added after the vocabulary, no BOS/EOS added, eos ``<|im_end|>``,
    pad ``<unk>``. ``vocab_size`` is a soft limit above 256 bytes plus the corpus characters."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [s for s in sentences if s.strip()]
    if not corpus:
        raise TokenizerError("train_sentencepiece_tokenizer: no non-empty sentences given")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(out / "tokenizer"),
                                   vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
                                   byte_fallback=True, hard_vocab_limit=False, split_digits=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<|startoftext|>",
                                   eos_piece=ENDOFTEXT_TOKEN,
                                   user_defined_symbols=[IM_START_TOKEN, IM_END_TOKEN, IM_SEP_TOKEN], num_threads=1,
                                   minloglevel=2)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    base = sp.get_piece_size()

    def entry(content: str) -> dict[str, object]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    decoder = {str(i): entry(sp.id_to_piece(i)) for i in range(base) if sp.is_control(i) or sp.is_unknown(i)
               or sp.id_to_piece(i) in (IM_START_TOKEN, IM_END_TOKEN, IM_SEP_TOKEN)}
    added = {}
    for tok in extra_special_tokens:
        if sp.piece_to_id(tok) != sp.unk_id() or tok in added:
            raise TokenizerError(f"extra special token {tok!r} is already in the vocabulary")
        added[tok] = base + len(added)
        decoder[str(added[tok])] = entry(tok)
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
              "bos_token": "<|startoftext|>", "eos_token": IM_END_TOKEN, "unk_token": "<unk>", "pad_token": "<unk>",
              "model_max_length": model_max_length, "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": decoder}
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "added_tokens.json", added)
    special_map = {key: config[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    _write_json(out / "special_tokens_map.json", special_map)
    return out
