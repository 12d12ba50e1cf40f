"""Tokenizer helpers: InternVL's special tokens, embedding resize, local loading, and a tiny SentencePiece builder.

* :data:`SPECIAL_TOKENS` are the nine tokens InternVL adds at fine-tune time (``tokenizer.add_tokens(...,
  special_tokens=True)``). Being *special* matters twice: each is one id (the model finds ``<IMG_CONTEXT>`` by id), and
  ``decode(skip_special_tokens=True)`` drops them, which is why MedRegA answers come back as ``name[[x1, y1, x2, y2]]``.
* :func:`add_special_tokens` also grows the LLM embeddings; new rows are the mean of the existing rows, for the input
  *and* the output matrix (the original set only the output rows and left the input rows at the resize default; the
  mean is a better start for both and makes the result deterministic).
* :func:`load_tokenizer` opens a local directory only (``local_files_only=True``, never ``trust_remote_code``). A
  SentencePiece ``tokenizer.model`` of the Llama family (Yi / Nous-Hermes-2-Yi, whose ``tokenizer_class`` is
  ``LlamaTokenizer`` or the remote ``YiTokenizer``) is loaded as transformers' ``LlamaTokenizer``; transformers 5.x
  converts the SentencePiece model to a ``tokenizers`` backend on load (needs ``sentencepiece`` + ``protobuf``).
* :func:`train_sentencepiece_tokenizer` writes such a directory from a few sentences (test fixtures, the bundled tiny
  model): a byte-fallback SentencePiece model with Yi's ChatML tokens as user-defined pieces and the nine InternVL tokens
  as added special tokens after the base vocabulary, like InternVL-Chat-V1-2's ``added_tokens.json``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from internvl.constants import (
    BOX_END,
    BOX_START,
    ENDOFTEXT_TOKEN,
    IM_END_TOKEN,
    IM_SEP_TOKEN,
    IM_START_TOKEN,
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_START_TOKEN,
    QUAD_END,
    QUAD_START,
    REF_END,
    REF_START,
)

__all__ = [
    "SPECIAL_TOKENS",
    "TokenizerError",
    "add_special_tokens",
    "resize_embeddings_mean",
    "load_tokenizer",
    "train_sentencepiece_tokenizer",
    "check_single_token_ids",
]

# Order as in the original constants.py (ids follow it when all nine are new).
SPECIAL_TOKENS: tuple[str, ...] = (
    IMG_START_TOKEN,
    IMG_END_TOKEN,
    IMG_CONTEXT_TOKEN,
    QUAD_START,
    QUAD_END,
    REF_START,
    REF_END,
    BOX_START,
    BOX_END,
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
    """Add :data:`SPECIAL_TOKENS` as special tokens (no-op for those already present) and, if ``model`` is given, grow
    its embeddings to ``len(tokenizer)`` with mean rows. Returns the number of tokens added to the tokenizer."""
    added = tokenizer.add_tokens(list(SPECIAL_TOKENS), special_tokens=True)
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
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise TokenizerError(f"{directory}: cannot load tokenizer: {exc}") from exc


def train_sentencepiece_tokenizer(
    sentences: Iterable[str],
    out_dir: str | os.PathLike,
    vocab_size: int = 1000,
    *,
    model_type: str = "bpe",
    model_max_length: int = 4096,
    extra_special_tokens: Iterable[str] = SPECIAL_TOKENS,
) -> Path:
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
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(out / "tokenizer"),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<|startoftext|>",
        eos_piece=ENDOFTEXT_TOKEN,
        user_defined_symbols=[IM_START_TOKEN, IM_END_TOKEN, IM_SEP_TOKEN],
        num_threads=1,
        minloglevel=2,
    )
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
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|startoftext|>",
        "eos_token": IM_END_TOKEN,
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": decoder,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n", encoding="utf-8")
    special_map = {"bos_token": "<|startoftext|>", "eos_token": IM_END_TOKEN, "unk_token": "<unk>", "pad_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out
