"""Tokenizer helpers: InternVL's special tokens, embedding resize, local loading and saving, answer decoding.

* :data:`SPECIAL_TOKENS` are the nine tokens InternVL adds at fine-tune time (``tokenizer.add_tokens(...,
  special_tokens=True)``); each must be one id (the model finds ``<IMG_CONTEXT>`` by id). Whether a tokenizer file
  flags them ``special`` differs between checkpoints (the bundled model: no; InternVL-Chat-V1-2: yes), and that flag
  decides what ``decode(skip_special_tokens=True)`` drops, so answers are never decoded that way: see below.
* :func:`decode_answer` is the toolkit's one answer-decoding policy (chat, batch_chat, ``medrega-eval run``, demo): it
  keeps the region tags ``<ref> </ref> <box> </box>`` and removes every other control token (ChatML template tokens,
  bos/eos/pad/unk, image tokens, ``<quad>``), whatever the file's flags say. Users see ``<ref>a</ref><box>[[..]]</box>``,
  which the demo and the evaluator parse unambiguously; ``--compat medrega`` strips the tags before scoring.
* :func:`add_special_tokens` adds the tokens that are missing (as special tokens, like the original) and leaves those
  already present as they are, flags included, so a fine-tuned tokenizer behaves like its source. It also grows the
  LLM embeddings; new rows are the mean of the existing rows, for the input *and* the output matrix (the original set
  only the output rows and left the input rows at the resize default; the mean is a better start for both and makes
  the result deterministic).
* :func:`load_tokenizer` opens a local directory only (``local_files_only=True``, never ``trust_remote_code``). A
  SentencePiece ``tokenizer.model`` of the Llama family (Yi / Nous-Hermes-2-Yi, whose ``tokenizer_class`` is
  ``LlamaTokenizer`` or the remote ``YiTokenizer``) is loaded as transformers' ``LlamaTokenizer``; transformers 5.x
  converts the SentencePiece model to a ``tokenizers`` backend on load (needs ``sentencepiece`` + ``protobuf``).
* :func:`save_tokenizer` is the one way the toolkit writes a tokenizer (run directories, checkpoints, merged models):
  ``save_pretrained`` plus the SentencePiece files of the source (``tokenizer.model``, ``added_tokens.json``,
  ``special_tokens_map.json``), then a reload through :func:`load_tokenizer` that must behave identically
  (:func:`tokenizer_behaviour`), else :class:`TokenizerError`.
* :func:`train_sentencepiece_tokenizer` writes such a directory from a few sentences (test fixtures, the bundled tiny
  model): a byte-fallback SentencePiece model with Yi's ChatML tokens as user-defined pieces and the nine InternVL tokens
  as added special tokens after the base vocabulary, like InternVL-Chat-V1-2's ``added_tokens.json``.
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
           "train_sentencepiece_tokenizer", "check_single_token_ids"]

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


def _language_model(model: torch.nn.Module) -> torch.nn.Module:
    # InternVLChatModel keeps its LLM in `.language_model`; a plain causal LM is used as is.
    return getattr(model, "language_model", None) or model


@torch.no_grad()
def resize_embeddings_mean(model: torch.nn.Module, new_size: int) -> int:
    """Grow the LLM's input (and untied output) embeddings to ``new_size`` rows, new rows = mean of the old rows.

    Returns the number of rows added (0 when the matrix is already large enough; it is never shrunk, since real
    checkpoints may pad their vocabulary). Updates ``config.vocab_size`` of the LLM and, when present, of
    ``model.config.llm_config``.
    """
    lm = _language_model(model)
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
    """Add the :data:`SPECIAL_TOKENS` the tokenizer lacks as special tokens and, if ``model`` is given, grow its
    embeddings to ``len(tokenizer)`` with mean rows. Returns the number of tokens that were new.

    Tokens already present (for example from ``added_tokens.json``) are left untouched, their ``special`` flag
    included: re-adding them would flip the flag and change what the tokenizer decodes, so a fine-tuned model's
    tokenizer would no longer match the one it came from.
    """
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
    """Load a tokenizer from a *local* directory (no hub access, no remote code).

    A directory with a SentencePiece ``tokenizer.model`` and a Llama-family (or absent) ``tokenizer_class`` is loaded
    as ``LlamaTokenizer`` -- the Yi path; any other directory goes through ``AutoTokenizer``. Raises
    :class:`TokenizerError` for a missing directory or one transformers cannot read.
    """
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
        # A named class is opened directly: AutoTokenizer would read the directory's model config.json and warn that
        # an `internvl_chat` config is used for a model of type ``.
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


def tokenizer_behaviour(tokenizer, texts: Iterable[str] = PROBE_TEXTS) -> dict[str, object]:
    """What a tokenizer does, as plain data to compare two tokenizers with ``==``: its size, added tokens with their
    ``special`` flags, special-token map, and for each text the ids (with and without the tokenizer's own special
    tokens), both ``skip_special_tokens`` decodings and :func:`decode_answer`."""
    per_text = []
    for text in texts:
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


def save_tokenizer(tokenizer, out_dir: str | os.PathLike, *, verify: bool = True) -> Path:
    """Write ``tokenizer`` to ``out_dir`` so that :func:`load_tokenizer` gives a tokenizer that behaves identically.

    ``save_pretrained`` writes ``tokenizer.json`` + ``tokenizer_config.json`` only (transformers 5.x); a tokenizer that
    came from a SentencePiece model also gets its ``tokenizer.model`` and an ``added_tokens.json`` (the tokens after
    the SentencePiece vocabulary, the layout of InternVL-Chat-V1-2), and every tokenizer a ``special_tokens_map.json``,
    so the directory has the files of the one it came from. With ``verify`` the directory is reloaded and compared
    with :func:`tokenizer_behaviour`; a difference raises :class:`TokenizerError` naming it. Returns ``out_dir``.
    """
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
    if verify:
        before, after = tokenizer_behaviour(tokenizer), tokenizer_behaviour(load_tokenizer(out))
        if before != after:
            raise TokenizerError(f"{out}: the saved tokenizer does not reload identically: "
                                 f"{_first_difference(before, after)}")
    return out


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the tokenizer knows it as one token, else None (no full-vocabulary dict is built)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return token_id


def _answer_drop_ids(tokenizer) -> set[int]:
    """Ids :func:`decode_answer` removes: every special token and every known control token, except the region tags."""
    drop = set(tokenizer.all_special_ids)
    drop.update(int(i) for i, tok in tokenizer.added_tokens_decoder.items() if tok.special)
    drop.update(i for i in (_token_id(tokenizer, tok) for tok in _CONTROL_TOKENS) if i is not None)
    drop.difference_update(i for i in (_token_id(tokenizer, tok) for tok in REGION_TAGS) if i is not None)
    return drop


def decode_answer(tokenizer, ids: Iterable[int] | torch.Tensor, *, separator: str | None = None) -> str:
    """Decode generated ``ids`` into the answer users see: region tags kept, every other control token removed.

    The toolkit's one decoding policy (``chat``, ``batch_chat``, ``medrega-eval run``, the demo). Kept:
    ``<ref> </ref> <box> </box>``, so ``<ref>a</ref><box>[[..]]</box>, <ref>b</ref><box>[[..]]</box>`` stays
    unambiguous for the parsers. Removed: the tokenizer's special tokens (bos/eos/pad/unk, ChatML template tokens) and
    ``<img> </img> <IMG_CONTEXT> <quad> </quad>``. The result does not depend on whether a tokenizer file flags the
    tags ``special``. With ``separator`` (the template's, e.g. ``<|im_end|>``) the answer ends before its first
    occurrence, as id or as text. Leading/trailing whitespace is stripped.
    """
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else [int(i) for i in ids]
    if separator:
        sep_id = _token_id(tokenizer, separator)
        if sep_id is not None and sep_id in ids:
            ids = ids[: ids.index(sep_id)]
    drop = _answer_drop_ids(tokenizer)
    text = tokenizer.decode([i for i in ids if i not in drop], skip_special_tokens=False)
    if separator:
        text = text.split(separator)[0]
    return text.strip()


def train_sentencepiece_tokenizer(sentences: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 1000, *,
                                  model_type: str = "bpe", model_max_length: int = 4096,
                                  extra_special_tokens: Iterable[str] = SPECIAL_TOKENS) -> Path:
    """Train a Yi-like SentencePiece tokenizer on ``sentences`` and write a directory :func:`load_tokenizer` reads.

    Layout (mirrors Nous-Hermes-2-Yi + InternVL-Chat-V1-2): ids 0/1/2 = ``<unk>``/``<|startoftext|>``/
    ``<|endoftext|>``, then the ChatML pieces ``<|im_start|>``, ``<|im_end|>``, ``<|im_sep|>`` as user-defined symbols,
    byte fallback (any text encodes, no ``<unk>``), then ``extra_special_tokens`` appended as added special tokens.
    ``add_bos_token``/``add_eos_token`` are False (as Yi's chat training), eos is ``<|im_end|>``, pad is ``<unk>`` (0).
    ``vocab_size`` must exceed 256 byte pieces plus the characters of the corpus; it is a soft limit for small corpora.
    Returns ``out_dir``. Takes well under a second for a few hundred sentences.
    """
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = [s for s in sentences if s.strip()]
    if not corpus:
        raise TokenizerError("train_sentencepiece_tokenizer: no non-empty sentences given")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_prefix=str(out / "tokenizer"),
                                   vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
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
