"""BERTScore from a local model directory (a tiny random BERT built here); clear errors without one."""
import json

import pytest

from medrega_eval import cli
from medrega_eval.metrics.model_based import bertscore
from medrega_eval.metrics.text import MetricUnavailable

WORDS = "no pleural effusion the heart is normal left lung mass small right large edema".split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, build_tiny_bert_dir):
    return build_tiny_bert_dir(tmp_path_factory.mktemp("bert"), WORDS, num_layers=2)


def test_bertscore_identical_is_one_and_differs_otherwise(tiny_bert):
    cands = ["no pleural effusion", "the heart is normal", "left lung mass"]
    mean, per = bertscore(cands, cands, tiny_bert)
    assert per == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    refs = ["small right effusion", "the heart is large", "edema"]
    mean2, per2 = bertscore(cands, refs, tiny_bert)
    assert all(-1 <= p < 0.9999 for p in per2) and mean2 < 1
    assert bertscore([""], ["edema"], tiny_bert)[1] == [0.0]


def test_bertscore_without_local_model_is_a_clear_error(tmp_path):
    with pytest.raises(MetricUnavailable, match="local model directory"):
        bertscore(["a"], ["a"], tmp_path / "missing")


def test_cli_bertscore_reported_or_unavailable(tmp_path, tiny_bert):
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"id": 1, "prediction": "no pleural effusion", "reference": "no pleural effusion"}) + "\n")
    assert cli.main(["score", "--task", "vqa", "--pred", str(pred), "--out", str(tmp_path / "o"),
                     "--bertscore-model", str(tiny_bert)]) == 0
    s = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert s["bertscore"] == pytest.approx(1.0, abs=1e-5)
    assert cli.main(["score", "--task", "vqa", "--pred", str(pred), "--out", str(tmp_path / "o2"),
                     "--bertscore-model", str(tmp_path / "nope")]) == 0
    s2 = json.loads((tmp_path / "o2" / "summary.json").read_text())
    assert s2["bertscore"] is None and "local model directory" in s2["unavailable"]["bertscore"]
