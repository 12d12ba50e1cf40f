"""BERTScore (Zhang et al. 2020) from *local* weights only (`--bertscore-model DIR`; never downloaded).

As the bert-score package: one hidden layer's embeddings, L2-normalized; P / R = idf-weighted mean of each token's
best cosine similarity to the other text; F1 their harmonic mean; no baseline rescaling. MedRegA used
microsoft/deberta-xlarge-mnli (en) and bert-base-multilingual-cased (zh).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from medrega_eval.metrics.text import MetricUnavailable

__all__ = ["bertscore"]


def _load(model_dir: str | Path):
    path = Path(model_dir)
    if not path.is_dir() or not (path / "config.json").is_file():
        raise MetricUnavailable(f"BERTScore needs a local model directory with config.json; {path} is not one "
                                "(pass e.g. a saved microsoft/deberta-xlarge-mnli with --bertscore-model)")
    from transformers import AutoModel, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        # safetensors only: a pickled pytorch_model.bin is never unpickled
        model = AutoModel.from_pretrained(str(path), local_files_only=True, use_safetensors=True).eval()
    except (OSError, ValueError) as exc:
        raise MetricUnavailable(f"BERTScore: cannot load {path}: {exc}") from exc
    return tokenizer, model


# bert-score's default layers for the models the original scorers name (bert_score.utils.model2layers)
ORIGINAL_LAYERS = {"en": 40, "zh": 9}  # microsoft/deberta-xlarge-mnli, bert-base-multilingual-cased


def bertscore(candidates: Sequence[str], references: Sequence[str], model_dir: str | Path, *, layer: int | None = None,
              original: bool = False) -> tuple[float, list[float]]:
    """(mean F1, per-sample F1) of candidates vs. single references with the model in `model_dir`.

    layer: hidden layer index (default: the last). Default rule: idf over the references, special tokens left out,
    uniform weights where idf gives a text zero weight, empty texts score 0. original=True is the bert-score package
    as the original scorers call it (`BERTScorer(idf=True, idf_sents=candidates)`): texts stripped, idf over the
    candidates (so [CLS]/[SEP], in every one, weigh log(1) = 0 but stay match targets), and a text whose weights sum
    to 0 scores 0 (bert-score's NaN -> 0).
    """
    if not candidates:
        return 0.0, []
    tokenizer, model = _load(model_dir)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if layer is not None and n_layers is not None and not 0 <= layer <= n_layers:
        raise MetricUnavailable(f"BERTScore: layer {layer} asked, but {model_dir} has {n_layers} layers "
                                "(the original uses layer 40 of deberta-xlarge-mnli / 9 of bert-base-multilingual-cased)")
    max_length = min(tokenizer.model_max_length, 10**6)

    def encode(texts: Sequence[str]) -> list[tuple[list[int], np.ndarray]]:
        ids = [tokenizer.encode(t.strip() if original else t, truncation=True, max_length=max_length) for t in texts]
        pairs = list(zip(ids, _embed(ids, tokenizer, model, layer)))
        if original:
            return pairs
        special = set(tokenizer.all_special_ids)
        keep = [[j for j, t in enumerate(x) if t not in special] for x in ids]
        return [([x[j] for j in k], vecs[k]) for (x, vecs), k in zip(pairs, keep)]

    cands, refs = encode(candidates), encode(references)
    weight = _idf([ids for ids, _ in (cands if original else refs)])
    scores = []
    for (c_ids, c_vec), (r_ids, r_vec) in zip(cands, refs):
        wc, wr = weight(c_ids), weight(r_ids)
        if not original:
            if not c_ids or not r_ids:
                scores.append(0.0)
                continue
            # idf is degenerate when every token occurs in every reference (e.g. a one-sample corpus): uniform weights
            wc = wc if wc.sum() > 0 else np.ones(len(c_ids))
            wr = wr if wr.sum() > 0 else np.ones(len(r_ids))
        scores.append(_greedy_f1(c_vec, r_vec, wc, wr))
    return float(np.mean(scores)), scores


def _embed(ids: list[list[int]], tokenizer, model, layer: int | None, batch_size: int = 16) -> list[np.ndarray]:
    """L2-normalized hidden states of `layer` (default: the last) for each token id list, right-padded in batches."""
    out = []
    pad = tokenizer.pad_token_id or 0
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        width = max(len(x) for x in chunk)
        inp = torch.tensor([x + [pad] * (width - len(x)) for x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
        with torch.no_grad():
            hidden = model(input_ids=inp, attention_mask=mask, output_hidden_states=True).hidden_states
        states = hidden[-1 if layer is None else layer].float().numpy()
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
