"""NLTK's METEOR with WordNet 3.0 from Debian's `wordnet-base`, offline: the report METEOR of `--compat medrega`.

The original report scorers average NLTK's `meteor_score([reference_tokens], hypothesis_tokens)` per sample, with
`word_tokenize` (EN) or `jieba.cut` (ZH) tokens. NLTK would download WordNet and punkt at run time; here WordNet is
built by `scripts/setup_wordnet.sh` and English tokens skip the punkt sentence split (docs/evaluation.md, "METEOR in
compat mode", says why the tokens are the same on the original's cleaned text).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import nltk
from nltk.corpus.reader.wordnet import WordNetCorpusReader
from nltk.tokenize import word_tokenize
from nltk.translate.meteor_score import meteor_score

from medrega_eval.metrics.text import MetricUnavailable

__all__ = ["nltk_data_dir", "load_wordnet", "tokenize_en", "meteor_scores"]

SETUP_HINT = "run scripts/setup_wordnet.sh (as root it installs Debian's wordnet-base and builds the NLTK layout)"


def nltk_data_dir() -> Path:
    """The NLTK data folder that holds (or will hold) corpora/wordnet: the rule of scripts/setup_wordnet.sh."""
    if os.environ.get("NLTK_DATA"):
        return Path(os.environ["NLTK_DATA"].split(os.pathsep)[0])
    if os.environ.get("MEDREGA_NLTK_DATA"):
        return Path(os.environ["MEDREGA_NLTK_DATA"])
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "medrega" / "nltk_data"


@lru_cache(maxsize=1)
def load_wordnet():
    """WordNet 3.0 as an NLTK corpus reader; MetricUnavailable (with the fix) when the folder is missing or broken."""
    root = nltk_data_dir()
    folder = root / "corpora" / "wordnet"
    needed = ["lexnames", "data.noun", "index.noun", "noun.exc", "index.sense"]
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise MetricUnavailable(f"METEOR (NLTK) needs WordNet in {folder} (missing {', '.join(missing)}): {SETUP_HINT}")
    if str(root) not in nltk.data.path:  # NLTK only reads corpora under its data path
        nltk.data.path.insert(0, str(root))
    try:
        with warnings.catch_warnings():  # "multilingual functions are not available": English WordNet is all METEOR uses
            warnings.filterwarnings("ignore", message=".*multilingual functions.*")
            reader = WordNetCorpusReader(str(folder), None)
        reader.synsets("heart")  # fail here, clearly, rather than inside the first METEOR call
    except (OSError, ValueError, LookupError) as exc:
        raise MetricUnavailable(f"METEOR (NLTK): cannot read WordNet in {folder}: {exc}; {SETUP_HINT}") from exc
    return reader


def tokenize_en(text: str) -> list[str]:
    """NLTK `word_tokenize` without the punkt sentence split, whose model no registry ships."""
    return word_tokenize(text, preserve_line=True)


def meteor_scores(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> list[float]:
    """Per-sample NLTK METEOR of token lists (one reference each), with WordNet synonyms."""
    wordnet = load_wordnet()
    return [float(meteor_score([list(ref)], list(hyp), wordnet=wordnet)) for hyp, ref in zip(hypotheses, references)]
