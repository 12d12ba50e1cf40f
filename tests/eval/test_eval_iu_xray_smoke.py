"""Smoke test on real report text: IU X-ray (Open-i) reports shipped in the torchxrayvision wheel.

Install for the test extras: `pip install --no-deps torchxrayvision==1.5.7` (the reports are CC BY-NC-ND 4.0 and
are read in place, never copied into the repository). Skips with the reason when the package is absent.
"""
import importlib.util
import os
import shutil
import tarfile
import xml.etree.ElementTree as ET

import pytest

from medrega_eval.metrics import text as T


def _reports():
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision not installed (pip install --no-deps torchxrayvision==1.5.7 for IU X-ray texts)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "NLMCXR_reports.tgz")
    if not os.path.exists(path):
        pytest.skip(f"{path} missing from the torchxrayvision install")
    out = []
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".xml"):
                root = ET.parse(tf.extractfile(m)).getroot()
                sec = {a.get("Label"): (a.text or "").strip() for a in root.iter("AbstractText")}
                out.append(sec)
    return out


@pytest.fixture(scope="module")
def reports():
    return _reports()


def test_report_metrics_on_iu_xray_impression_vs_findings(reports):
    pairs = [(r["IMPRESSION"], r["FINDINGS"]) for r in reports if r.get("IMPRESSION") and r.get("FINDINGS")]
    assert len(pairs) > 3000
    pairs = pairs[:400]
    cands = [T.tokenize_en(p) for p, _ in pairs]
    refs = [[T.tokenize_en(f)] for _, f in pairs]
    bleu, per = T.coco_bleu(cands, refs)
    rouge, _ = T.corpus_rouge_l(cands, refs)
    cider, _ = T.coco_cider(cands, refs)
    # impressions summarise findings: some overlap, far from identical
    assert 0.01 < bleu[0] < 0.6 and bleu[3] < bleu[0] and 0.05 < rouge < 0.6 and 0 < cider < 2
    # identical text scores (near) perfectly on the same real corpus
    self_bleu, _ = T.coco_bleu(cands, [[c] for c in cands])
    assert self_bleu[0] == pytest.approx(1.0, abs=1e-6)
    if shutil.which("java"):
        meteor, scores = T.coco_meteor(cands[:100], refs[:100])
        assert 0.02 < meteor < 0.6 and len(scores) == 100


@pytest.mark.skipif(shutil.which("java") is None, reason="java not installed: PTBTokenizer needs it")
def test_tokenizer_matches_ptb_on_iu_xray(reports):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [r[k] for r in reports for k in ("FINDINGS", "IMPRESSION") if r.get(k)]
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    mismatched = [t for i, t in enumerate(texts) if T.tokenize_en(t) != ptb[i][0].split()]
    # measured: 3 of 14,544 IU sections (all four kinds) differ (glued "xxxx.r/o", "iv''s", "weakness/lp" edge cases)
    assert len(mismatched) <= len(texts) // 1000, mismatched[:5]
