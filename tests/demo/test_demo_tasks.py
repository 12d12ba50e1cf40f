"""Demo task -> prompt wiring: every task builds the registry's wording in the trainer's order, in both languages."""
from __future__ import annotations

import pytest

from internvl.data.prompts import get_prompt
from internvl.demo.tasks import TASKS, build_prompt, split_names
from internvl.demo.uploads import UserInputError
from internvl.regions import Box, parse_regions

INPUTS = {"question": "What modality is used to take this image?", "box": Box(100, 200, 300, 400),
          "objects": "left frontal lobe, right thalamus", "options": "normal, glioma", "modality": "MRI"}


@pytest.mark.parametrize("lang", ["en", "zh"])
@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_builds_image_first_with_the_registry_base_prompt(task: str, lang: str) -> None:
    prompt = build_prompt(task, lang, **INPUTS)
    assert prompt.startswith("<image>\n") and prompt.count("<image>") == 1
    tp = get_prompt(TASKS[task], lang)
    key = {"classification": "disease"}.get(tp.family, "organ" if tp.task == "grounded_whole" else None)
    first_words = tp.base_template(key).split("{")[0][:12]
    assert first_words in prompt


def test_task_inputs_land_in_the_prompt() -> None:
    t2r = build_prompt("text_to_region", "en", objects="left frontal lobe；右侧丘脑", modality="MRI")
    assert "<ref>left frontal lobe</ref>" in t2r and "<ref>右侧丘脑</ref>" in t2r and "MRI scan" in t2r
    r2t = build_prompt("region_to_text", "en", box=Box(1, 2, 3, 4), modality="CT")
    assert parse_regions(r2t.split("\n", 1)[1])[0].boxes == [Box(1, 2, 3, 4)]
    dx = build_prompt("diagnosis", "en", options="normal\nglioma", modality="MRI")
    assert "normal\nglioma" in dx
    vqa = build_prompt("vqa", "zh", question="这张图片的成像方式是什么?")
    assert vqa.endswith("这张图片的成像方式是什么?请用词或短语回答问题。")


def test_missing_inputs_give_page_messages() -> None:
    with pytest.raises(UserInputError, match="empty"):
        build_prompt("vqa", "en", question="  ")
    with pytest.raises(UserInputError, match="needs a box"):
        build_prompt("region_to_text", "en")
    with pytest.raises(UserInputError, match="needs the name"):
        build_prompt("text_to_region", "en", objects=" , ")
    with pytest.raises(UserInputError, match="two different"):
        build_prompt("diagnosis", "en", options="glioma")
    with pytest.raises(UserInputError, match="Unknown task"):
        build_prompt("segmentation", "en")
    with pytest.raises(UserInputError, match="Unknown language"):
        build_prompt("vqa", "fr", question="x")
    assert split_names("a, b、c；d\ne") == ["a", "b", "c", "d", "e"]
