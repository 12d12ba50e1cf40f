"""`--compat medrega` report METEOR (NLTK + WordNet from Debian's wordnet-base), the ROUGE-EN bootstrap spread and
the original's BERTScore rule (issue #15 items 6 and 8).

WordNet comes from `scripts/setup_wordnet.sh`, which the tests call: it installs `wordnet-base` when run as root with
apt-get and builds NLTK's layout. A machine that cannot install it (not root, no apt-get: exit 3) skips the METEOR
tests with that reason; any other failure of the script fails them."""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from medrega_eval import cli
from medrega_eval.metrics import meteor as M
from medrega_eval.metrics.model_based import bertscore

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wordnet(tmp_path_factory):
    data = tmp_path_factory.mktemp("nltk_data")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "setup_wordnet.sh")], env={**os.environ, "NLTK_DATA": str(data)},
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"WordNet cannot be installed here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scripts/setup_wordnet.sh failed ({proc.returncode}): {proc.stderr}"
    old = os.environ.get("NLTK_DATA")
    os.environ["NLTK_DATA"] = str(data)
    M.load_wordnet.cache_clear()
    yield data
    M.load_wordnet.cache_clear()
    if old is None:
        del os.environ["NLTK_DATA"]
    else:
        os.environ["NLTK_DATA"] = old


def test_setup_builds_lexnames_and_nltk_reads_wordnet(wordnet):
    lexnames = (wordnet / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[0] == "00\tadj.all\t3" and lexnames[18] == "18\tnoun.person\t1"
    assert lexnames[44] == "44\tadj.ppl\t3"
    wn = M.load_wordnet()
    assert wn.get_version() == "3.0" and wn.synsets("dog")[0].lexname() == "noun.animal"


def test_builtin_lexnames_table_equals_the_manual_page(wordnet, tmp_path):
    """Without the manual page (Docker images drop /usr/share/man) the script's own table gives the same file."""
    env = {**os.environ, "NLTK_DATA": str(tmp_path), "MEDREGA_LEXNAMES_MAN": str(tmp_path / "no-man-page.gz")}
    subprocess.run(["bash", str(REPO / "scripts" / "setup_wordnet.sh")], env=env, check=True, capture_output=True)
    built_in = (tmp_path / "corpora" / "wordnet" / "lexnames").read_text()
    assert built_in == (wordnet / "corpora" / "wordnet" / "lexnames").read_text()


def test_meteor_uses_wordnet_synonyms_hand_worked(wordnet):
    # "sick" ~ "ill" through WordNet: 4 matches in one chunk -> 1 - 0.5 * (1/4)^3. (NLTK looks synonyms up on the
    # Porter stems left over from its stem stage, so "large" ~ "big" does not match: "larg" is no WordNet word.)
    assert M.meteor_scores([["the", "heart", "is", "sick"]], [["the", "heart", "is", "ill"]]) == [0.9921875]
    assert M.meteor_scores([["the", "heart", "is", "large"]], [["the", "heart", "is", "big"]]) == [
        pytest.approx(0.75 * (1 - 0.5 / 27), abs=1e-12)]
    # without the synonym: 3 of 4 matched, one chunk -> fmean 0.75, penalty 0.5 * (1/3)^3
    assert M.meteor_scores([["the", "heart", "is", "tiny"]], [["the", "heart", "is", "big"]]) == [
        pytest.approx(0.75 * (1 - 0.5 / 27), abs=1e-12)]


def test_tokenizer_without_punkt_on_cleaned_text():
    # the original's cleaned report text: parts joined by "." with no space, "?"/"!" split by the word tokenizer
    assert M.tokenize_en("no acute process.heart size normal? yes. it's fine") == [
        "no", "acute", "process.heart", "size", "normal", "?", "yes.", "it", "'s", "fine"]


def test_meteor_missing_wordnet_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path / "empty"))
    M.load_wordnet.cache_clear()
    with pytest.raises(M.MetricUnavailable, match="setup_wordnet.sh"):
        M.load_wordnet()


def _report(tmp_path, name, rows, *args):
    pred = tmp_path / f"{name}.json"
    pred.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / f"out_{name}"
    assert cli.main(["score", "--task", "report", "--compat", "medrega", "--pred", str(pred), "--out", str(out),
                     *args]) == 0
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_report_meteor_en_and_zh(tmp_path, wordnet):
    en = _report(tmp_path, "rg_en", [{"pred_answer": "The heart is sick.", "gt_answer": "The heart is ill."}],
                 "--lang", "en")
    assert en["meteor"] == 0.9921875 and "meteor" not in en["unavailable"]
    import jieba
    from nltk.translate.meteor_score import meteor_score

    pred, ref = "1. 心脏大小正常。\n2. 双肺纹理清晰", "心脏大小正常，双肺纹理清晰。"
    zh = _report(tmp_path, "rg_zh", [{"pred_answer": pred, "gt_answer": ref}], "--lang", "zh")
    cleaned = "心脏大小正常。，双肺纹理清晰".replace("。，", "，")  # cleanStr_zh: "N." removed, lines joined with "，"
    expected = meteor_score([list(jieba.cut(ref))], list(jieba.cut(cleaned)), wordnet=M.load_wordnet())
    assert zh["meteor"] == pytest.approx(expected, abs=1e-12) and 0 < zh["meteor"] < 1


def test_rouge_en_bootstrap_spread_brackets_the_mean(tmp_path):
    rng = np.random.default_rng(1)
    words = "no acute cardiopulmonary process heart size normal lungs clear effusion pneumothorax".split()
    rows = [{"pred_answer": " ".join(rng.choice(words, 8)), "gt_answer": " ".join(rng.choice(words, 9))}
            for _ in range(40)]
    s = _report(tmp_path, "rg_rouge", rows, "--lang", "en", "--metrics", "bleu1,bleu4,rougeL")
    spread = s["details"]["rouge_bootstrap"]
    for key, top in (("rouge1", s["rouge1"]), ("rougeL", s["rougeL"])):
        assert spread[key]["seeds"] == 20 and spread[key]["min"] < spread[key]["max"]
        assert spread[key]["min"] - 1e-12 <= top <= spread[key]["max"] + 1e-12, key
    state = np.random.get_state()[1].copy()
    _report(tmp_path, "rg_rouge2", rows, "--lang", "en", "--metrics", "rougeL")
    assert (np.random.get_state()[1] == state).all()  # the global numpy random state is left alone


# ------------------------------------------------------------------------------------------ item 8: BERTScore
WORDS = "no pleural effusion the heart is normal left lung mass small right large edema".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, build_tiny_bert_dir):
    return build_tiny_bert_dir(tmp_path_factory.mktemp("bert"), WORDS, num_layers=3)


def _by_hand(cands, refs, model_dir, layer):
    """bert-score's documented rule, step by step, for the check: ids with [CLS]/[SEP]; idf over the candidates;
    cosine of layer `layer`; weighted greedy P and R over all tokens; F = 2PR/(P+R), NaN -> 0."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    ids = lambda s: tok.encode(s.strip())  # noqa: E731  ("" -> [CLS] [SEP])
    m = len(cands)
    df: dict[int, int] = {}
    for c in cands:
        for t in set(ids(c)):
            df[t] = df.get(t, 0) + 1
    idf = lambda t: math.log((m + 1) / (df.get(t, 0) + 1))  # noqa: E731
    out = []
    for c, r in zip(cands, refs):
        emb = []
        for s in (c, r):
            with torch.no_grad():
                h = model(torch.tensor([ids(s)]), output_hidden_states=True).hidden_states[layer][0]
            emb.append(torch.nn.functional.normalize(h, dim=-1))
        sim = emb[0] @ emb[1].T
        wc = torch.tensor([idf(t) for t in ids(c)])
        wr = torch.tensor([idf(t) for t in ids(r)])
        p = float((sim.max(1).values * wc).sum() / wc.sum())
        rr = float((sim.max(0).values * wr).sum() / wr.sum())
        f = 2 * p * rr / (p + rr)
        out.append(0.0 if math.isnan(f) else f)
    return out


def test_bertscore_original_rule(tiny_bert):
    cands = ["no pleural effusion", "the heart is normal", "left lung mass", ""]
    refs = ["small right effusion", "the heart is large", "left lung mass", "edema"]
    mean, per = bertscore(cands, refs, tiny_bert, layer=2, original=True)
    assert per == pytest.approx(_by_hand(cands, refs, tiny_bert, 2), abs=1e-5)
    assert per[3] == 0.0 and mean == pytest.approx(sum(per) / 4)
    assert bertscore(cands, refs, tiny_bert, layer=1, original=True)[1] != pytest.approx(per, abs=1e-4)
    _, default = bertscore(cands, refs, tiny_bert, layer=2)  # ours: idf from references, specials left out
    assert default != pytest.approx(per, abs=1e-4)
    with pytest.raises(M.MetricUnavailable, match="layer 40"):
        bertscore(cands, refs, tiny_bert, layer=40, original=True)


def test_bertscore_refuses_pickled_weights(tmp_path, tiny_bert):
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(tiny_bert, d)
    from transformers import BertModel

    model = BertModel.from_pretrained(d, use_safetensors=True)
    (d / "model.safetensors").unlink()
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(M.MetricUnavailable, match="cannot load"):
        bertscore(["edema"], ["edema"], d)


def test_cli_compat_bertscore_uses_the_original_texts(tmp_path, tiny_bert):
    rows = [{"pred_answer": "Left lung.", "gt_answer": "left lung"}, {"pred_answer": "no", "gt_answer": "no"}]
    pred = tmp_path / "slake_test.json"
    pred.write_text(json.dumps(rows))
    out = tmp_path / "o"
    assert cli.main(["score", "--task", "vqa", "--compat", "medrega", "--pred", str(pred), "--out", str(out),
                     "--bertscore-model", str(tiny_bert), "--bertscore-layer", "3"]) == 0
    s = json.loads((out / "summary.json").read_text())
    # the original's EN texts are its cleanStr output: "left lung," vs "left lung"
    expected = _by_hand(["left lung,", "no"], ["left lung", "no"], tiny_bert, 3)
    assert s["bertscore"] == pytest.approx(sum(expected) / 2, abs=1e-5)
