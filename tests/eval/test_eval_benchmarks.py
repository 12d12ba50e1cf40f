"""Benchmark registry: every shipped entry loads and renders its prompt; user files; missing data; sample loading."""
import json

import pytest
from PIL import Image

from medrega_eval.benchmarks import BenchmarkError, MissingData, load_registry, load_samples

PAPER = {"slake_en", "slake_zh", "vqarad", "pathvqa", "pmcvqa_v1", "pmcvqa_v2", "mimic_cxr", "iu_xray",
         "region2text", "text2region_ss", "text2region_sm", "text2region_ms", "text2region_mm", "grounded_mimic_cxr",
         "mura", "oct2017", "chexpert", "cxr14", "medreg_mini_vqa", "medreg_mini_text2region"}


def test_every_shipped_benchmark_is_valid_and_renders_its_prompt():
    reg = load_registry()
    assert PAPER <= set(reg)
    assert sum(b.task == "classification" for b in reg.values()) >= 23
    for b in reg.values():
        assert b.download, b.name
        for lang in (["en", "zh"] if b.lang == "auto" else [b.lang]):
            prompt = b.render_prompt(lang)
            assert prompt is None or len(prompt) > 20, b.name
    assert "possible" in reg["oct2017"].render_prompt("en") and "drusen" in reg["oct2017"].render_prompt("en")


def test_missing_data_says_what_to_download(tmp_path):
    reg = load_registry()
    with pytest.raises(MissingData, match="SLAKE"):
        reg["slake_en"].locate(tmp_path)
    with pytest.raises(MissingData, match="MEDREGA_DATA"):
        reg["slake_en"].locate(None)


def _user_benchmark(tmp_path, extra=""):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 32), "white").save(tmp_path / "imgs" / "a.png")
    rows = [
        {"id": "q1", "image": "a.png", "conversations": [{"from": "human", "value": "What is shown?"},
                                                         {"from": "gpt", "value": "heart"}]},
        {"id": "q2", "image": "missing.png", "conversations": [{"from": "human", "value": "x"},
                                                               {"from": "gpt", "value": "y"}]},
        {"id": "q3", "image": "a.png", "width": 64, "height": 32,
         "conversations": [{"from": "human", "value": "<image>\n这是什么器官?"}, {"from": "gpt", "value": "心脏"}]},
        {"id": "q1", "image": "a.png", "conversations": [{"from": "human", "value": "dup"}, {"from": "gpt", "value": "d"}]},
        {"id": "q5", "conversations": [{"from": "gpt", "value": "wrong order"}]},
    ]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "{bad\n",
                                         encoding="utf-8")
    yml = tmp_path / "mine.yaml"
    yml.write_text("benchmarks:\n  my_vqa:\n    task: vqa\n    annotation: test.jsonl\n    image_root: imgs\n"
                   f"    prompt: {{task: vqa_open}}\n{extra}", encoding="utf-8")
    return yml


def test_user_benchmark_samples_and_problems(tmp_path):
    reg = load_registry([_user_benchmark(tmp_path)])
    samples, problems, root = load_samples(reg["my_vqa"], tmp_path)
    assert [s.id for s in samples] == ["q1", "q3"] and root == tmp_path / "imgs"
    assert {p.reason for p in problems} == {"image-not-found", "duplicate-id", "bad-turns", "invalid-json"}
    q1, q3 = samples
    assert q1.lang == "en" and q3.lang == "zh" and q3.hw == [32, 64]
    # base prompt first, then the image, then the question (the original inference order)
    assert q1.question.endswith("<image>\nWhat is shown?") and q1.question.startswith("You are")
    assert q3.question.startswith("你是") and "<image>\n这是什么器官?" in q3.question


def test_bad_registry_entries_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("benchmarks:\n  x:\n    task: segmentation\n    annotation: a.jsonl\n")
    with pytest.raises(BenchmarkError, match="bad.yaml: benchmark 'x': task"):
        load_registry([bad])
    bad.write_text("benchmarks:\n  x: {task: classification, annotation: a.jsonl}\n")
    with pytest.raises(BenchmarkError, match="needs options"):
        load_registry([bad])
    bad.write_text("benchmarks:\n  slake_en: {task: vqa, annotation: a.jsonl}\n")
    with pytest.raises(BenchmarkError, match="already defined"):
        load_registry([bad])
    bad.write_text("benchmarks: [\n")
    with pytest.raises(BenchmarkError, match=r"bad.yaml:\d+: invalid YAML"):
        load_registry([bad])


def test_options_from_references_are_per_language_for_run_and_score(tmp_path):
    """`options: from_references` gives one label list per language, the same for `run` and `score --benchmark`;
    `score --options` overrides it."""
    from medrega_eval import cli
    from medrega_eval.benchmarks import reference_options
    from medrega_eval.io import PredictionRecord

    pairs = [("en", "pneumonia"), ("zh", "肺炎"), ("en", "normal, pneumonia"), ("en", "normal")]
    assert reference_options(pairs, multilabel=False) == {"en": ["pneumonia", "normal, pneumonia", "normal"],
                                                          "zh": ["肺炎"]}
    assert reference_options(pairs, multilabel=True) == {"en": ["pneumonia", "normal"], "zh": ["肺炎"]}
    yml = tmp_path / "b.yaml"
    yml.write_text("benchmarks:\n  my_cls:\n    task: classification\n    annotation: c.jsonl\n"
                   "    options: from_references\n", encoding="utf-8")
    records = [PredictionRecord(id=str(i), prediction="x", reference=ref, source=f"p.jsonl:{i}", lang=lang)
               for i, (lang, ref) in enumerate(pairs[:2])]
    base = ["score", "--pred", "p.jsonl", "--out", "o", "--benchmark", "my_cls", "--benchmark-file", str(yml)]
    bench = load_registry([yml])["my_cls"]
    cfg = cli._score_config(cli.build_parser().parse_args(base), bench, records)
    assert cfg.options == {"en": ["pneumonia"], "zh": ["肺炎"]}
    cfg = cli._score_config(cli.build_parser().parse_args([*base, "--options", "a,b"]), bench, records)
    assert cfg.options == ["a", "b"]
