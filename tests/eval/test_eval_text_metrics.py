"""Text metrics: tokenizers, ROUGE-L hand-worked, BLEU/CIDEr vs pycocoevalcap, HF-style BLEU."""
import math
import shutil

import pytest

from medrega_eval.metrics import text as T

HAS_JAVA = shutil.which("java") is not None
REPORTS = [
    ("The heart is normal in size. No pleural effusion (small) or pneumothorax.",
     "Heart size is normal. There is no pleural effusion or pneumothorax."),
    ("Mild cardiomegaly, doesn't change; 2.5cm nodule in the right upper lobe.",
     "Stable mild cardiomegaly. 2.5 cm nodule, right upper lobe, e.g. granuloma."),
    ("Lungs are clear. Dr. Smith was notified at 10:30.", "The lungs are clear. No acute disease."),
    ("", "No acute cardiopulmonary process."),
]


def test_tokenize_en_follows_ptb_conventions():
    assert T.tokenize_en("The patient doesn't have a 2.5cm nodule (right lung); e.g. 10% size.") == [
        "the", "patient", "does", "n't", "have", "a", "2.5", "cm", "nodule", "-lrb-", "right", "lung", "-rrb-",
        "e.g.", "10", "%", "size"]
    assert T.tokenize_en("Cannot exclude effusion. Dr. X-ray and/or CT.") == [
        "can", "not", "exclude", "effusion", "dr.", "x-ray", "and/or", "ct."]


def test_tokenize_zh_drops_punctuation_and_keeps_segments():
    toks = T.tokenize_zh("影像结论：右侧颞枕部肿块，考虑恶性占位性病变。")
    assert "：" not in toks and "，" not in toks and "。" not in toks
    assert "".join(toks) == "影像结论右侧颞枕部肿块考虑恶性占位性病变"
    assert len(toks) > 3


@pytest.mark.skipif(not HAS_JAVA, reason="java not installed: pycocoevalcap's PTBTokenizer needs it")
def test_tokenize_en_equals_pycocoevalcap_ptbtokenizer():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    texts = [t for pair in REPORTS for t in pair if t]
    ptb = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, t in enumerate(texts):
        assert T.tokenize_en(t) == ptb[i][0].split(), t


def _corpus():
    cands = [T.tokenize_en(p) for p, _ in REPORTS]
    refs = [[T.tokenize_en(r)] for _, r in REPORTS]
    return cands, refs


def test_bleu_and_cider_equal_pycocoevalcap_on_same_tokens():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = _corpus()
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(c)] for i, c in enumerate(cands)}
    want_bleu, want_per = Bleu(4).compute_score(gts, res, verbose=0)
    got_bleu, got_per = T.coco_bleu(cands, refs)
    assert got_bleu == pytest.approx(want_bleu, abs=1e-12)
    assert got_per[3] == pytest.approx(list(want_per[3]), abs=1e-12)
    want_cider, want_cider_per = Cider().compute_score(gts, res)
    got_cider, got_cider_per = T.coco_cider(cands, refs)
    assert got_cider == pytest.approx(want_cider, abs=1e-12)
    assert got_cider_per == pytest.approx(list(want_cider_per), abs=1e-12)
    assert 0 < got_bleu[0] < 1 and got_cider > 0


def test_rouge_l_hand_worked():
    # LCS("a b c", "a c d e f") = 2: P = 2/3, R = 2/5; F = (1 + b^2) P R / (R + b^2 P), b = 1.2; best P and R over refs
    cands = [["a", "b", "c"], ["a", "b", "c"], [], [], ["a"]]
    refs = [[["a", "c", "d", "e", "f"]], [["x"], ["c", "b", "a", "b", "c"]], [["a"]], [[]], [["b"]]]
    mean, per = T.corpus_rouge_l(cands, refs)
    assert per == pytest.approx([2.44 * (2 / 3) * 0.4 / (0.4 + 1.44 * 2 / 3), 2.44 * 0.6 / (0.6 + 1.44), 0, 0, 0])
    assert mean == pytest.approx(sum(per) / 5) and T.corpus_rouge_l([], []) == (0.0, [])


def test_rouge_l_on_chinese_segments_is_not_zero():
    ref = T.tokenize_zh("右侧基底节区肿块，考虑恶性占位性病变")
    cand = T.tokenize_zh("右侧基底节区占位性病变")
    assert 0.3 < T.corpus_rouge_l([cand], [[ref]])[0] < 1.0


def test_hf_bleu_hand_worked():
    cand = [["the", "cat", "sat", "on", "the", "mat"]]
    ref = [[["the", "cat", "is", "on", "the", "mat"]]]
    assert T.hf_bleu(cand, ref, max_order=1) == pytest.approx(5 / 6)
    assert T.hf_bleu(cand, ref, max_order=2) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # a zero 4-gram precision makes the whole HF score 0 (no smoothing)
    assert T.hf_bleu([["a", "b", "c"]], [[["a", "b", "d"]]], max_order=4) == 0.0
    # brevity penalty uses the shortest reference
    assert T.hf_bleu([["a", "b"]], [[["a", "b", "c"], ["a", "b", "c", "d"]]], max_order=1) == pytest.approx(
        math.exp(1 - 3 / 2))


def test_sentence_bleu1_hand_worked():
    assert T.sentence_bleu1(["a", "b"], [["a", "b", "c", "d"]]) == pytest.approx(math.exp(1 - 4 / 2))
    assert T.sentence_bleu1(["a", "a", "a"], [["a", "b", "c"]]) == pytest.approx(1 / 3)
    assert T.sentence_bleu1([], [["a"]]) == 0.0


def test_token_set_scores():
    s = T.token_set_scores(["left", "lung", "lung"], ["left", "upper", "lung", "lobe"])
    assert s == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}


def test_meteor_without_java_fails_clearly(monkeypatch):
    monkeypatch.setattr(T.shutil, "which", lambda name: None)
    with pytest.raises(T.MetricUnavailable, match="Java"):
        T.coco_meteor([["a"]], [[["a"]]])


@pytest.mark.skipif(not HAS_JAVA, reason="java not installed")
def test_meteor_ranks_identical_above_unrelated():
    cands, refs = _corpus()
    score, per = T.coco_meteor(cands[:3] + [refs[0][0]], refs[:3] + [refs[0]])
    assert per[3] > 0.9 and all(0 <= p <= 1 for p in per) and 0 < score < 1
