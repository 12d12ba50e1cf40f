"""Tokenizers and text-overlap metrics shared by every task (conventions: docs/evaluation.md, "Metrics (default)").

English tokens follow pycocoevalcap's Java `PTBTokenizer` in pure Python, Chinese ones are jieba segments; BLEU,
CIDEr-D, ROUGE-L and METEOR 1.5 (needs `java`) are pycocoevalcap's own scorers fed with those tokens.
"""
from __future__ import annotations

import atexit
import html
import logging
import math
import re
import shutil
import unicodedata
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

__all__ = ["MetricUnavailable", "PTB_PUNCTUATION", "tokenize_en", "tokenize_zh", "tokenize", "has_cjk", "text_language",
           "corpus_rouge_l", "coco_bleu", "coco_cider", "coco_meteor", "sentence_bleu1",
           "hf_bleu", "token_set_scores", "prf"]


class MetricUnavailable(RuntimeError):
    """A metric cannot run here (missing Java, missing local weights, ...); the message says how to fix it."""


# pycocoevalcap/tokenizer/ptbtokenizer.py removes exactly these tokens after PTB tokenization.
PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# Stanford PTB lexer rules that matter for report text, in priority order.
_EN_TOKEN = re.compile(
    r"""
    <[a-z]+\s*/?>                          # HTML-ish tags such as <br> stay one token
    | (?:[a-z]\.){2,}(?![a-z0-9])            # abbreviations: e.g. i.e. a.m.
    | \d+(?:[.,:]\d+)+                      # numbers with separators: 1.5  1,000  10:30  (2.5cm -> 2.5 cm)
    | [.,]\d+(?:[.,]\d+)*                    # numbers glued to a separator: ,786.05  x1 .5
    | n't(?![a-z])                          # contraction tails split off by PTB
    | '(?:s|re|ve|ll|d|m)(?![a-z])
    | [^\W_](?:[^\W_]|[-_&/@](?=[^\W_]))*?(?=n't(?![a-z]))   # "does" of "doesn't"
    | [^\W\d_](?:[^\W_]|[-_&/@+](?=[^\W_])|\.(?=[^\W\d_]))*   # words: x-ray, and/or, s.o.b, effusion.heart
    | \d(?:[^\W_]|[-_&/@+](?=[^\W_]))*      # digit-led words: 7th, 2v, 02/010/xxxx
    | _+                                    # runs of underscores (MIMIC de-identification)
    | \.\.\.|--|[^\w\s]                     # punctuation, one symbol at a time
    """,
    re.VERBOSE,
)
# PTB escapes brackets; pycocoevalcap removes the upper-case escapes only, so after -lowerCase they survive.
_BRACKET_TOKENS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def tokenize_en(text: str) -> list[str]:
    """English tokens in pycocoevalcap's convention: PTB-style split, lower-cased, punctuation tokens removed.

    Reproduces pycocoevalcap's quirks on purpose so that our numbers are the literature's: brackets survive as
    '-lrb-'/'-rrb-' (pycocoevalcap only removes the upper-case escapes but tokenizes with -lowerCase), quotes are
    dropped, "cannot" becomes "can not", HTML entities are unescaped, and '%', '#', '+', '>' stay tokens.
    """
    text = html.unescape(unicodedata.normalize("NFKC", text)).lower()
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    text = _CANNOT.sub("can not", text)
    out: list[str] = []
    prev_end = -1
    for m in _EN_TOKEN.finditer(text):
        tok = m.group()
        if tok == "." and out and prev_end == m.start() and out[-1][-1].isalnum():
            following = text[m.end() : m.end() + 2].lstrip()
            keep = (
                out[-1] in _PTB_ABBREVIATIONS
                or (len(out[-1]) == 1 and out[-1].isalpha())  # initials: "c."
                or (out[-1] == "no" and following[:1].isdigit())  # "no. 5"
                or text[m.end() : m.end() + 1] in (";", ",", ":")  # period glued to more punctuation
            )
            if keep:
                out[-1] += "."  # PTB keeps the period of a known abbreviation, or one glued to more punctuation
                prev_end = m.end()
                continue
        prev_end = m.end()
        if tok in PTB_PUNCTUATION or tok == '"':
            continue
        out.append(_BRACKET_TOKENS.get(tok, tok))
    return out


# Abbreviations whose period the Stanford PTB lexer (CoreNLP 3.4.1) keeps (checked against the jar).
_PTB_ABBREVIATIONS = frozenset(
    "dr mr mrs ms prof etc inc co corp ltd ind md va ga st jr sr mo gen sen rep ft mt sept al ct pa vs fig "
    "jan feb mar apr jun jul aug sep oct nov dec conn calif colo fla ariz ark kan kans ky mich minn miss mont "
    "neb nev okla ore penn tenn tex vt wash wis wyo del ala".split()
)
_CANNOT = re.compile(r"\bcannot\b")


_ZH_PUNCT = re.compile(r"^[\W_]+$")


@lru_cache(maxsize=1)
def _get_jieba():
    """Import jieba once, silencing its 'Building prefix dict' log lines."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def tokenize_zh(text: str) -> list[str]:
    """Chinese tokens: jieba segments of NFKC-normalized, lower-cased text (Latin words too: "ct", "72mm");
    whitespace and pure punctuation dropped."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [seg for seg in (s.strip() for s in _get_jieba().cut(text)) if seg and not _ZH_PUNCT.match(seg)]


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def has_cjk(text: str) -> bool:
    """True when the text contains a CJK ideograph (used to pick the tokenizer when no language is given)."""
    return any(map(_is_cjk, text))


#: A box list in either form (``<box>..</box>`` or a bare ``[[..]]``), removed before text metrics look at words.
BOX_TEXT_RE = re.compile(r"<box>.*?</box>|\[\[[^\[\]]*(?:\][^\[\]]*)*?\]\]", re.DOTALL)
_LANG_TAGS_RE = re.compile(r"</?(?:ref|box|image)>")
_LATIN_WORD_RE = re.compile(r"[A-Za-z]+")


def text_language(text: str) -> str | None:
    """The language of a text by the CJK-share rule (docs/evaluation.md): boxes and tags removed, names kept, "zh"
    when CJK ideographs >= Latin words, "en" below, None when there are neither."""
    clean = _LANG_TAGS_RE.sub(" ", BOX_TEXT_RE.sub(" ", text))
    cjk = sum(map(_is_cjk, clean))
    words = len(_LATIN_WORD_RE.findall(clean))
    if cjk + words == 0:
        return None
    return "zh" if cjk >= words else "en"


def tokenize(text: str, lang: str) -> list[str]:
    """The tokens of `text` in `lang` ('en' or 'zh', checked where the language is read)."""
    return {"en": tokenize_en, "zh": tokenize_zh}[lang](text)


# ---------------------------------------------------------------------------------------- pycocoevalcap scorers
def _coco_inputs(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]):
    """pycocoevalcap's (gts, res) dicts of the space-joined tokens (tokens hold no spaces: it splits on them)."""
    return {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}, {
        i: [" ".join(c)] for i, c in enumerate(candidates)}


def _coco_score(scorer, candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
                ) -> tuple[float, list[float]]:
    """pycocoevalcap's ``scorer.compute_score``: (corpus score, per-sample scores); (0.0, []) for no sample."""
    if not candidates:
        return 0.0, []
    score, scores = scorer.compute_score(*_coco_inputs(candidates, references))
    return float(score), [float(s) for s in scores]


def corpus_rouge_l(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
                   ) -> tuple[float, list[float]]:
    """pycocoevalcap's ROUGE-L (LCS, beta 1.2, P and R maximised over the references): mean and per-sample F. An
    empty candidate scores 0 (pycocoevalcap would give it 1 against a reference without tokens)."""
    per = [s if c else 0.0 for c, s in zip(candidates, _coco_score(Rouge(), candidates, references)[1])]
    return (float(np.mean(per)) if per else 0.0), per


def coco_bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], n: int = 4
              ) -> tuple[list[float], list[list[float]]]:
    """pycocoevalcap's corpus BLEU-1..n ('closest' reference length) and per_sample[k][i] = BLEU-(k+1) of sample i."""
    if not candidates:
        return [0.0] * n, [[] for _ in range(n)]
    score, scores = Bleu(n).compute_score(*_coco_inputs(candidates, references), verbose=0)
    return [float(s) for s in score], [[float(v) for v in row] for row in scores]


def coco_cider(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
               ) -> tuple[float, list[float]]:
    """CIDEr-D exactly as pycocoevalcap reports it (document frequencies from this corpus's references, x10).
    MetricUnavailable when no reference has a token (pycocoevalcap divides by the largest document frequency)."""
    if candidates and not any(tokens for refs in references for tokens in refs):
        raise MetricUnavailable("CIDEr needs at least one reference with a token (every reference is empty or "
                                "punctuation only)")
    return _coco_score(Cider(), candidates, references)


def coco_meteor(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]
                ) -> tuple[float, list[float]]:
    """METEOR 1.5 through pycocoevalcap's bundled jar (needs `java` on PATH; MetricUnavailable otherwise)."""
    if shutil.which("java") is None:
        raise MetricUnavailable("METEOR needs a Java runtime (pycocoevalcap runs meteor-1.5.jar); install one, e.g. "
                                "`apt-get install default-jre-headless`, or leave METEOR out with --metrics")
    return _coco_score(_meteor_process(), candidates, references) if candidates else (0.0, [])


_METEOR = None


def _meteor_process():
    """One METEOR JVM per process, started on first use (it loads ~60 MB of paraphrase tables, so reuse pays)."""
    global _METEOR
    if _METEOR is None or _METEOR.meteor_p.poll() is not None:
        _METEOR = Meteor()
        atexit.register(_close_meteor, _METEOR.meteor_p)
    return _METEOR


def _close_meteor(proc) -> None:
    """Stop a METEOR JVM at interpreter exit; `communicate` closes its pipes (no ResourceWarning)."""
    proc.kill()
    proc.communicate()


# ------------------------------------------------------------------------------------ sentence-level helpers
def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu1(candidate: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Sentence BLEU-1 = brevity penalty (closest reference length) x clipped unigram precision: torchmetrics'
    `BLEUScore(n_gram=1)`, what the MedRegA VQA / Region-to-Text / classification scorers average. Empty -> 0."""
    if not candidate or not references:
        return 0.0
    max_ref: Counter = Counter()
    for ref in references:
        max_ref |= Counter(ref)
    matches = sum(min(c, max_ref[t]) for t, c in Counter(candidate).items())
    if matches == 0:
        return 0.0
    c_len = len(candidate)
    r_len = min((abs(len(r) - c_len), len(r)) for r in references)[1]
    bp = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return bp * matches / c_len


def hf_bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]], max_order: int = 4
            ) -> float:
    """Corpus BLEU as Hugging Face `evaluate`'s 'bleu' computes it (tensorflow/nmt compute_bleu, no smoothing), for
    `--compat medrega` on sacrebleu 13a tokens: unlike pycocoevalcap, the brevity penalty uses the *shortest*
    reference lengths and a zero n-gram precision makes the score 0."""
    matches = [0] * max_order
    possible = [0] * max_order
    ref_len = cand_len = 0
    for cand, refs in zip(candidates, references):
        ref_len += min(len(r) for r in refs)
        cand_len += len(cand)
        merged: Counter = Counter()
        for r in refs:
            for order in range(1, max_order + 1):
                merged |= _ngrams(r, order)
        for order in range(1, max_order + 1):
            matches[order - 1] += sum((_ngrams(cand, order) & merged).values())  # clipped counts
            possible[order - 1] += max(len(cand) - order + 1, 0)
    precisions = [m / p if p > 0 else 0.0 for m, p in zip(matches, possible)]
    if min(precisions) <= 0 or cand_len == 0:
        return 0.0
    geo_mean = math.exp(sum(math.log(p) for p in precisions) / max_order)
    ratio = cand_len / ref_len if ref_len else float("inf")
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * bp


def tokenize_13a(text: str) -> list[str]:
    """sacrebleu's '13a' tokenization (what `evaluate`'s bleu uses by default), split on whitespace."""
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text).split()


def token_set_scores(pred_tokens: Sequence[str], ref_tokens: Sequence[str]) -> dict[str, float]:
    """Set-overlap precision, recall and F1 of two token lists (the MedRegA/MultiMedEval VQA convention: repeated
    words count once; an empty reference has recall 0)."""
    p, r = set(pred_tokens), set(ref_tokens)
    precision, recall, f1 = prf(len(p & r), len(p), len(r))
    return {"precision": precision, "recall": recall, "f1": f1}


def prf(hits: int, n_pred: int, n_ref: int) -> tuple[float, float, float]:
    """Precision ``hits / n_pred``, recall ``hits / n_ref`` and their F1 (each 0.0 where its denominator is 0)."""
    precision = hits / n_pred if n_pred else 0.0
    recall = hits / n_ref if n_ref else 0.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0
