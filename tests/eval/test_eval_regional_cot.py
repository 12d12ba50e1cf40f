"""Regional CoT (paper §5): registry prompts in both languages, the two-step flow over a scripted generator (step-two
prompts carry the step-one boxes in the one box grammar), and `medrega-eval run --regional-cot` end to end on the tiny
model: records keep the step-one regions, report.html draws them, resume refuses mixing CoT and plain answers."""
import json

import numpy as np
import pytest

from internvl.data.prompts import LANGS, get_prompt
from internvl.inference import GenerationRequest, Generator
from internvl.regional_cot import RegionalCotGenerator, split_question
from internvl.regions import Box, Region, format_regions, parse_regions
from medrega_eval import cli

BOX_ANSWER = "<ref>liver</ref><box>[[10, 20, 300, 400]]</box>, <ref>spleen</ref><box>[[600, 100, 700, 300]]</box>"
EN_Q = ("<image>\nYou are a helpful medical assistant. You are required to answer the question based on the medical "
        "image. Is the liver enlarged?")
ZH_Q = "<image>\n你是一个医疗助手，你需要根据医学图像回答问题。肝脏是否增大？"


def _is_step_one(prompt: str) -> bool:
    return any(get_prompt("regional_cot_locate", lang).questions[0].split("{")[0] in prompt for lang in LANGS)


class ScriptedGenerator:
    """Stands in for internvl.inference.Generator: step one finds boxes only for requests whose id starts with
    'box'; step two answers 'yes'. Records every prompt it was given, per call."""

    batch_size = 2

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def generate_batch(self, requests):
        self.calls.append([r.prompt for r in requests])
        return [(BOX_ANSWER if str(r.id).startswith("box") else "no idea") if _is_step_one(r.prompt) else "yes"
                for r in requests]


def test_given_languages_override_the_guess():
    """A request's `lang` (the demo's page language, a benchmark sample's) words the prompts: a Chinese page asking
    in English gets the Chinese locate and answer prompts; without it the language is guessed (English here)."""
    zh_locate = get_prompt("regional_cot_locate", "zh").questions[0].split("{")[0]
    guessed, given = ScriptedGenerator(), ScriptedGenerator()
    RegionalCotGenerator(guessed).generate_batch([GenerationRequest(EN_Q, id="box")])
    RegionalCotGenerator(given).generate_batch([GenerationRequest(EN_Q, id="box", lang="zh")])
    assert zh_locate not in guessed.calls[0][0] and zh_locate in given.calls[0][0]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in given.calls[1][0].split("Is the liver")[0])


@pytest.mark.parametrize("task", ["regional_cot_locate", "regional_cot_answer"])
def test_registry_has_both_languages(task):
    en, zh = (get_prompt(task, lang) for lang in LANGS)
    assert en.questions[0] != zh.questions[0] and "{question}" in en.questions[0] and "{question}" in zh.questions[0]
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh.questions[0])
    if task == "regional_cot_answer":
        assert "{regions}" in en.questions[0] and "{regions}" in zh.questions[0]


def test_two_steps_put_step_one_boxes_into_step_two_prompt():
    gen = ScriptedGenerator()
    requests = [GenerationRequest(EN_Q, id="box-en"), GenerationRequest(ZH_Q, id="box-zh"),
                GenerationRequest(EN_Q, id="none")]
    out = RegionalCotGenerator(gen).generate_batch(requests)
    assert len(gen.calls) == 2 and all(_is_step_one(p) for p in gen.calls[0])
    # step one: the registry's locate prompt in the question's language, around the question without its preamble
    assert "Question: Is the liver enlarged?" in gen.calls[0][0] and "问题：肝脏是否增大？" in gen.calls[0][1]
    expected = [Region("liver", [Box(10, 20, 300, 400)]), Region("spleen", [Box(600, 100, 700, 300)])]
    boxes = format_regions(expected)
    en2, zh2, none2 = gen.calls[1]
    assert en2 == ("<image>\nYou are a helpful medical assistant. You are required to answer the question based on "
                   f"the medical image. Regions found in this image: {boxes}.\nIs the liver enlarged?")
    assert zh2 == f"<image>\n你是一个医疗助手，你需要根据医学图像回答问题。图像中找到的区域：{boxes}。\n肝脏是否增大？"
    assert parse_regions(en2) == expected  # the one grammar reads back exactly the step-one regions
    assert none2 == EN_Q  # no region found: the original question unchanged
    assert [o.answer for o in out] == ["yes", "yes", "yes"]
    assert out[0].regions == expected and out[2].regions == [] and out[2].step_one_answer == "no idea"
    assert out[0].record_fields() == {"cot_regions": [{"name": "liver", "boxes": [[10, 20, 300, 400]]},
                                                      {"name": "spleen", "boxes": [[600, 100, 700, 300]]}],
                                      "cot_step_one": BOX_ANSWER}


def test_split_question_keeps_image_and_preamble_in_head():
    assert split_question(EN_Q)[1] == "Is the liver enlarged?"
    assert split_question("What is this?") == ("", "What is this?")


@pytest.fixture
def setup(tmp_path, tiny_model, tiny_tokenizer, write_eval_benchmark):
    rng = np.random.default_rng(0)
    rows = [{"id": f"box{i}" if i < 2 else "plain", "image": f"{i}.png", "width": 32, "height": 24,
             "conversations": [{"from": "human", "value": EN_Q}, {"from": "gpt", "value": "yes"}]} for i in range(3)]
    model_dir, data, yml, _ = write_eval_benchmark(
        tmp_path, tiny_model, tiny_tokenizer, rows, name="tiny_vqa", task="vqa",
        pixels=lambda i: rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
        extra_yaml="    download: nothing to download\n")
    return ["run", "--model", str(model_dir), "--benchmark", "tiny_vqa", "--benchmark-file", str(yml),
            "--data-dir", str(data), "--out", str(tmp_path / "out"), "--dtype", "float32", "--max-new-tokens", "4",
            "--batch-size", "2"], tmp_path / "out" / "tiny_vqa"


def test_run_regional_cot_records_draws_and_refuses_mixing(setup, monkeypatch, capsys):
    args, bdir = setup
    scripted = ScriptedGenerator()
    monkeypatch.setattr(Generator, "generate_batch", lambda self, requests: scripted.generate_batch(requests))
    assert cli.main([*args, "--regional-cot"]) == 0
    assert len(scripted.calls) == 4  # 3 samples in batches of 2, two steps each
    assert json.loads((bdir / "run_settings.json").read_text())["regional_cot"] is True
    rows = {r["id"]: r for r in map(json.loads, (bdir / "predictions.jsonl").read_text().splitlines())}
    assert rows["box0"]["cot_regions"][0] == {"name": "liver", "boxes": [[10, 20, 300, 400]]}
    assert rows["box0"]["cot_step_one"] == BOX_ANSWER and rows["box0"]["prediction"] == "yes"
    assert rows["plain"]["cot_regions"] == [] and rows["plain"]["cot_step_one"] == "no idea"
    report = (bdir / "report.html").read_text()
    section = report.split("Regional CoT step-one regions", 1)[1].split("<h2>", 1)[0]
    assert section.count("<figure><img src=\"data:image/png;base64,") == 2  # box0, box1 drawn; plain has none
    assert "step-one regions</th>" in report and "&lt;ref&gt;liver&lt;/ref&gt;&lt;box&gt;[[10, 20, 300, 400]]" in report
    # resuming the same out without the flag (or the other way round) would merge two kinds of answers: refused
    scripted.calls.clear()
    assert cli.main(args) != 0
    assert "regional_cot: recorded True, now False" in capsys.readouterr().err and scripted.calls == []
    assert cli.main([*args, "--regional-cot"]) == 0 and scripted.calls == []  # same flag: resumes, nothing redone


def test_plain_run_then_cot_resume_is_refused(setup, monkeypatch, capsys):
    args, bdir = setup
    scripted = ScriptedGenerator()
    monkeypatch.setattr(Generator, "generate_batch", lambda self, requests: scripted.generate_batch(requests))
    assert cli.main(args) == 0
    rows = [json.loads(x) for x in (bdir / "predictions.jsonl").read_text().splitlines()]
    assert all("cot_regions" not in r for r in rows) and "Regional CoT" not in (bdir / "report.html").read_text()
    assert cli.main([*args, "--regional-cot"]) != 0
    assert "regional_cot: recorded False, now True" in capsys.readouterr().err
