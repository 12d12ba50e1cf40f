"""The web UI's chat goes through the shared generation path (`internvl.inference.Generator`, as `--batch` and
`medrega-eval run`): same answers as the model's own multi-turn `chat`, history carried turn to turn, boxes drawn."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from internvl.demo.app import DemoEngine, Session, ask, build_app
from internvl.demo.uploads import UserInputError
from internvl.image_processing import images_to_pixel_values
from internvl.inference import GenerationSettings

SETTINGS = GenerationSettings(max_new_tokens=8)


def _image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def test_engine_turns_equal_multi_turn_chat_and_use_batch_chat(tiny_model, tiny_tokenizer, monkeypatch):
    image = _image()
    pixel_values, patches = images_to_pixel_values([image], tiny_model.config)
    gen = SETTINGS.to_kwargs()
    want_1, hist = tiny_model.chat(tiny_tokenizer, pixel_values, "Where is the liver?", gen, return_history=True,
                                   num_patches_list=patches)
    want_2 = tiny_model.chat(tiny_tokenizer, pixel_values, "And the spleen?", gen, history=hist,
                             num_patches_list=patches)

    calls = []
    batch_chat = tiny_model.batch_chat
    monkeypatch.setattr(tiny_model, "batch_chat", lambda *a, **k: calls.append(k["histories"]) or batch_chat(*a, **k))
    monkeypatch.setattr(tiny_model, "chat", lambda *a, **k: pytest.fail("the demo must not call model.chat"))
    engine = DemoEngine(tiny_model, tiny_tokenizer, SETTINGS)
    got_1, history, step_one = engine.answer(image, "Where is the liver?", [])
    got_2, history, _ = engine.answer(image, "And the spleen?", history)
    assert step_one == []  # no Regional CoT unless asked
    assert (got_1, got_2) == (want_1, want_2)
    assert history == [("<image>\nWhere is the liver?", got_1), ("And the spleen?", got_2)]
    assert calls == [[[]], [[("<image>\nWhere is the liver?", got_1)]]]


def test_batch_chat_with_histories_equals_chat(tiny_model, tiny_tokenizer):
    pixel_values = torch.randn(2, 3, 56, 56)
    gen = SETTINGS.to_kwargs()
    _, hist = tiny_model.chat(tiny_tokenizer, pixel_values[:1], "What is shown?", gen, return_history=True)
    batched = tiny_model.batch_chat(tiny_tokenizer, pixel_values, ["And the liver?", "Where is the heart?"], gen,
                                    num_patches_list=[1, 1], histories=[hist, []])
    assert batched == [tiny_model.chat(tiny_tokenizer, pixel_values[:1], "And the liver?", gen, history=hist),
                       tiny_model.chat(tiny_tokenizer, pixel_values[1:], "Where is the heart?", gen)]
    with pytest.raises(ValueError, match="histories"):
        tiny_model.batch_chat(tiny_tokenizer, pixel_values, ["a", "b"], gen, num_patches_list=[1, 1], histories=[[]])


def test_ask_follow_up_turns_and_bad_input(tiny_model, tiny_tokenizer):
    engine = DemoEngine(tiny_model, tiny_tokenizer, SETTINGS)
    session = Session()
    with pytest.raises(UserInputError, match="Upload an image"):
        ask(engine, session, task="vqa", lang="en", question="What is shown?")
    session.image = _image(1)
    annotated, rows, status = ask(engine, session, task="vqa", lang="en", question="What is shown?")
    assert annotated.size[0] * 48 == annotated.size[1] * 64 and isinstance(rows, list) and "Answered" in status
    ask(engine, session, task="vqa", lang="en", question="Is it normal?")
    assert len(session.history) == 2 and session.history[0][0].startswith("<image>")
    assert "<image>" not in session.history[1][0] and len(session.chat) == 4
    assert session.history[1][0] == "Is it normal?"  # a follow-up is the user's text as is
    with pytest.raises(UserInputError, match="cannot contain <image>"):
        ask(engine, session, task="vqa", lang="en", question="<image> again?")


def test_build_app_wires_every_element(tiny_model, tiny_tokenizer):
    app = build_app(DemoEngine(tiny_model, tiny_tokenizer, SETTINGS), [], model_name="tiny")
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"upload", "axis", "slice", "editor", "gallery", "task", "lang", "modality", "question", "objects", "box",
            "box_units", "options", "ask", "clear", "status", "annotated", "chat", "boxes"} <= ids
    names = sorted(getattr(f.fn, "__name__", "") for f in app.fns.values())
    assert names == ["_empty_file_box", "on_ask", "on_ask", "on_clear", "on_example", "on_lang", "on_upload"]  # ask: button, Enter


def test_regional_cot_toggle_draws_step_one_regions(tiny_model, tiny_tokenizer, monkeypatch):
    """With the Regional CoT toggle the engine goes through `internvl.regional_cot.RegionalCotGenerator` (the same
    two steps as `medrega-eval run --regional-cot`) with its prompts in the page language; the step-one regions are
    drawn after the answer's own, labelled "step 1"."""
    from internvl.regional_cot import CotAnswer, RegionalCotGenerator
    from internvl.regions import Box, Region

    calls = []

    def fake_cot(self, requests):
        calls.append((self.generator, requests, [r.lang for r in requests]))
        return [CotAnswer(answer="<ref>liver</ref><box>[[100, 100, 500, 500]]</box>",
                          regions=[Region("liver", [Box(90, 90, 520, 510)])], step_one_answer="a1")]

    monkeypatch.setattr(RegionalCotGenerator, "generate_batch", fake_cot)
    engine = DemoEngine(tiny_model, tiny_tokenizer, SETTINGS)
    session = Session(image=_image())
    _, rows, _ = ask(engine, session, task="text_to_region", lang="zh", objects="liver", cot=True)
    assert len(calls) == 1 and calls[0][0] is engine.generator and len(calls[0][1]) == 1
    assert calls[0][2] == ["zh"]  # the page language, not a guess from the (English) object name
    assert [row["name"] for row in rows] == ["liver", "第一步：liver"]
    assert session.history[-1][1].startswith("<ref>liver</ref>")


def test_upload_handler_takes_the_nifti_slice_number_and_reports_bad_ones_in_the_page(tiny_model, tiny_tokenizer,
                                                                                      tmp_path):
    """The slice box is a gradio number field (whole, >= 0; gradio refuses anything else); the handler passes it on,
    and a slice outside the volume is an error line in the page, never an exception."""
    import gradio as gr
    import nibabel as nib

    from internvl.demo.app import _handlers

    app = build_app(DemoEngine(tiny_model, tiny_tokenizer, SETTINGS), [], model_name="tiny")
    (slice_box,) = [b for b in app.blocks.values() if getattr(b, "elem_id", None) == "slice"]
    assert isinstance(slice_box, gr.Number) and slice_box.precision == 0 and slice_box.minimum == 0
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).integers(0, 1000, (20, 24, 16)).astype(np.int16), np.eye(4)),
             path)
    upload = _handlers(DemoEngine(tiny_model, tiny_tokenizer, SETTINGS), []).upload
    editor, session, status = upload(str(path), "coronal", 3, Session(), "en")
    assert "coronal slice 3" in status and session.image is not None and editor["background"] is session.image
    _, session, status = upload(str(path), "coronal", 99, Session(), "en")
    assert status.startswith("**Error:**") and "v.nii.gz" in status


def test_examples_are_decoded_once_and_bad_entries_name_their_place(tiny_model, tiny_tokenizer, monkeypatch, tmp_path):
    """`load_examples` decodes each image once; the gallery and the example handler reuse it (no second decode)."""
    import json
    from types import SimpleNamespace

    from internvl.demo import app as app_module
    from internvl.demo.app import _handlers, load_examples

    _image().save(tmp_path / "a.png")
    entry = {"file": "a.png", "title": "A", "task": "vqa", "lang": "en", "question": "What is shown?"}
    (tmp_path / "examples.json").write_text(json.dumps([entry]))
    calls = []
    decode = app_module.load_upload
    monkeypatch.setattr(app_module, "load_upload", lambda *a, **k: calls.append(a) or decode(*a, **k))
    examples = load_examples(tmp_path)
    engine = DemoEngine(tiny_model, tiny_tokenizer, SETTINGS)
    build_app(engine, examples, model_name="tiny")
    editor, session, task, *_, status = _handlers(engine, examples).example(SimpleNamespace(index=0), "en")
    assert len(calls) == 1 and session.image is examples[0].image and editor["background"] is examples[0].image
    assert task == "vqa" and "Example loaded" in status
    (tmp_path / "examples.json").write_text(json.dumps([{**entry, "file": "missing.png"}]))
    with pytest.raises(ValueError, match=r"examples.json: entry 0: missing.png"):
        load_examples(tmp_path)
