"""Model-based text metrics from *local* weights only: BERTScore (Zhang et al. 2020).

MedRegA's scorers use BERTScore F1 with microsoft/deberta-xlarge-mnli (English) or bert-base-multilingual-cased
(Chinese), idf weighting and no baseline rescaling. Here the model is whatever local directory the user passes
(`--bertscore-model DIR`); nothing is ever downloaded: a missing or incomplete directory raises MetricUnavailable.

Algorithm (as the bert-score package): contextual embeddings of one hidden layer, L2-normalized; precision = mean over
candidate tokens of the best cosine similarity to any reference token, recall the other way round, F1 their harmonic
mean; with idf, token weights are log((M + 1) / (df + 1)) over the M references, and the [CLS]/[SEP] tokens are
excluded; when idf gives a text zero total weight (a token set shared by every reference), that text falls
back to uniform weights. RadGraph F1 and CheXbert are not provided: their packages fetch weights from the hub
at run time.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medrega_eval.metrics.text import MetricUnavailable

__all__ = ["bertscore"]


def _load(model_dir: str | Path, device: str):
    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MetricUnavailable(f"BERTScore needs a local model directory with config.json; {path} is not one "
                                "(pass e.g. a saved microsoft/deberta-xlarge-mnli with --bertscore-model)")
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # safetensors only: a pickled pytorch_model.bin is never unpickled
        model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).to(device).eval()
    except (OSError, ValueError) as exc:
        raise MetricUnavailable(f"BERTScore: cannot load {path}: {exc}") from exc
    return tokenizer, model


# bert-score's default layers for the models the original scorers name (bert_score.utils.model2layers)
ORIGINAL_LAYERS = {"en": 40, "zh": 9}  # microsoft/deberta-xlarge-mnli, bert-base-multilingual-cased


def bertscore(candidates: Sequence[str], references: Sequence[str], model_dir: str | Path, *, layer: int | None = None,
              idf: bool = True, batch_size: int = 16, device: str = "cpu",
              original: bool = False) -> tuple[float, list[float]]:
    """(mean F1, per-sample F1) of candidates vs. single references with the model in `model_dir`.

    layer: hidden layer index (default: the last). Empty texts score 0.
    original=True follows the bert-score package as the original scorers call it (`BERTScorer(idf=True,
    idf_sents=candidates)`): texts stripped, idf counted over the *candidates* (special tokens included, so [CLS] and
    [SEP] get weight log(1) = 0), [CLS]/[SEP] kept as match targets, and a text whose idf weights sum to 0 scores 0
    (bert-score's NaN -> 0) instead of falling back to uniform weights.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} references")
    if not candidates:
        return 0.0, []
    tokenizer, model = _load(model_dir, device)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if layer is not None and n_layers is not None and not 0 <= layer <= n_layers:
        raise MetricUnavailable(f"BERTScore: layer {layer} asked, but {model_dir} has {n_layers} layers "
                                "(the original uses layer 40 of deberta-xlarge-mnli / 9 of bert-base-multilingual-cased)")
    if original:
        return _bertscore_original(candidates, references, tokenizer, model, layer, batch_size, device)
    special = set(tokenizer.all_special_ids)

    def encode(texts: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
        ids = [tokenizer(t, truncation=True)["input_ids"] for t in texts]
        out = []
        for x, vecs in zip(ids, _embed(ids, tokenizer, model, layer, batch_size, device)):
            keep = [j for j, t in enumerate(x) if t not in special]
            out.append(([x[j] for j in keep], vecs[keep]))
        return out

    return _greedy_scores(encode(candidates), encode(references), idf)


def _embed(ids: list[list[int]], tokenizer, model, layer: int | None, batch_size: int, device: str) -> list[np.ndarray]:
    """L2-normalized hidden states of `layer` (default: the last) for each token id list, right-padded in batches."""
    import torch

    out = []
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        inp = torch.tensor([x + [pad] * (width - len(x)) for x in chunk], device=device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk], device=device)
        with torch.no_grad():
            hidden = model(input_ids=inp, attention_mask=mask, output_hidden_states=True).hidden_states
        states = hidden[-1 if layer is None else layer].float().cpu().numpy()
        for i, x in enumerate(chunk):
            vecs = states[i, :len(x)]
            out.append(vecs / np.clip(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12, None))
    return out


def _idf(id_lists: Sequence[list[int]]):
    """bert-score's idf over ``id_lists`` as a function ``ids -> weights``: log((M + 1) / (df + 1)) per token."""
    m = len(id_lists)
    df = Counter(t for ids in id_lists for t in set(ids))
    return lambda ids: np.array([math.log((m + 1) / (df[t] + 1)) for t in ids])


def _greedy_f1(c_vec: np.ndarray, r_vec: np.ndarray, wc: np.ndarray, wr: np.ndarray) -> float:
    """Weighted greedy-matching F1 of two L2-normalized token embedding sets (0 where it is 0/0, as bert-score)."""
    sim = c_vec @ r_vec.T
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (sim.max(axis=1) * wc).sum() / wc.sum()
        r = (sim.max(axis=0) * wr).sum() / wr.sum()
        f = float(2 * p * r / (p + r))
    return 0.0 if math.isnan(f) else f


def _greedy_scores(cand_enc, ref_enc, idf: bool) -> tuple[float, list[float]]:
    weight = _idf([ids for ids, _ in ref_enc]) if idf else (lambda ids: np.ones(len(ids)))
    scores = []
    for (c_ids, c_vec), (r_ids, r_vec) in zip(cand_enc, ref_enc):
        if not c_ids or not r_ids:
            scores.append(0.0)
            continue
        wc, wr = weight(c_ids), weight(r_ids)
        # idf is degenerate when every token occurs in every reference (e.g. a one-sample corpus): uniform weights
        wc = wc if wc.sum() > 0 else np.ones(len(c_ids))
        wr = wr if wr.sum() > 0 else np.ones(len(r_ids))
        scores.append(_greedy_f1(c_vec, r_vec, wc, wr))
    return float(np.mean(scores)), scores


def _bertscore_original(candidates, references, tokenizer, model, layer, batch_size, device):
    """The bert-score package's rule (see `bertscore(original=True)`)."""
    def ids_of(text: str) -> list[int]:
        text = text.strip()
        if not text:  # bert-score: build_inputs_with_special_tokens([]), i.e. only the special tokens
            return tokenizer.encode("", add_special_tokens=True)
        return tokenizer.encode(text, add_special_tokens=True, truncation=True,
                                max_length=min(tokenizer.model_max_length, 10**6))

    def embed(ids: list[list[int]]) -> list[tuple[list[int], np.ndarray]]:
        return list(zip(ids, _embed(ids, tokenizer, model, layer, batch_size, device)))

    cand_ids = [ids_of(c) for c in candidates]
    weight = _idf(cand_ids)  # idf over the candidates, as the original scorers call bert-score
    scores = [_greedy_f1(c_vec, r_vec, weight(c_ids), weight(r_ids))
              for (c_ids, c_vec), (r_ids, r_vec) in zip(embed(cand_ids), embed([ids_of(r) for r in references]))]
    return float(np.mean(scores)), scores
