"""Tests for internvl.templates: byte-exact Hermes-2 / internvl2_5 strings (spec §2.6) and label segments."""
from __future__ import annotations

import json
from importlib import resources

import pytest

from internvl.templates import ChatTemplate, TemplateError, get_template

CONV = [
    {"from": "human", "value": "<image>\nWhat is present?"},
    {"from": "gpt", "value": "heart"},
    {"from": "human", "value": "And here?"},
    {"from": "gpt", "value": "lung"},
]


def test_hermes2_inference_prompt_is_byte_exact() -> None:
    tpl = get_template("Hermes-2")
    prompt = tpl.render([{"role": "user", "content": "<image>\nWhat is present?"}])
    assert prompt == ("<|im_start|>system\nAnswer the questions.<|im_end|>"
                      "<|im_start|>user\n<image>\nWhat is present?<|im_end|><|im_start|>assistant\n")


def test_hermes2_training_conversation_is_byte_exact() -> None:
    tpl = get_template("Hermes-2")
    assert tpl.render(CONV) == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is present?<|im_end|><|im_start|>assistant\nheart<|im_end|>"
        "<|im_start|>user\nAnd here?<|im_end|><|im_start|>assistant\nlung<|im_end|>")
    assert tpl.sep == "<|im_end|>"
    assert tpl.stop_strings[0] == "<|im_end|>"
    assert set(tpl.stop_strings) == {"<|im_end|>", "<|endoftext|>", "<|im_start|>", "<|im_sep|>"}


def test_segments_concatenate_to_render_and_supervise_answers_plus_sep() -> None:
    tpl = get_template("Hermes-2")
    segs = tpl.segments(CONV)
    assert "".join(t for t, _ in segs) == tpl.render(CONV, add_generation_prompt=False)
    assert [t for t, sup in segs if sup] == ["heart<|im_end|>", "lung<|im_end|>"]
    unsupervised = "".join(t for t, sup in segs if not sup)
    assert "heart" not in unsupervised and unsupervised.count("<|im_start|>assistant\n") == 2


def test_internvl2_5_newline_after_sep_is_not_supervised() -> None:
    tpl = get_template("internvl2_5")
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tpl.render(msgs) == (
        "<|im_start|>system\n" + tpl.system_message + "<|im_end|>\n"
        "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n")
    segs = tpl.segments(msgs)
    assert [t for t, sup in segs if sup] == ["a<|im_end|>"]
    assert segs[-1] == ("\n", False)
    assert tpl.system_message.startswith("你是书生·万象")


def test_system_message_override() -> None:
    tpl = get_template("Hermes-2")
    msgs = [{"role": "user", "content": "q"}]
    assert tpl.render(msgs, system_message="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tpl.render(msgs, add_generation_prompt=False).endswith("q<|im_end|>")


def test_unknown_template_lists_known_names() -> None:
    with pytest.raises(TemplateError, match="Hermes-2"):
        get_template("nope")


def test_every_shipped_template_loads_matches_its_file_and_holds_the_invariants() -> None:
    """What the renderer relies on, checked once here for every shipped file instead of at each load."""
    files = [p for p in resources.files("internvl.templates").iterdir() if p.name.endswith(".json")]
    names = []
    for path in files:
        data = json.loads(path.read_text(encoding="utf-8"))
        assert set(data) <= {"name", "description", "system_template", "system_message", "roles", "sep", "label_sep",
                             "stop_strings"}, path.name
        tpl = get_template(data["name"])
        assert tpl.sep == data["sep"] and tpl.user_role == data["roles"]["user"]
        assert tpl.sep.startswith(tpl.label_sep) and "{system_message}" in tpl.system_template, path.name
        assert tpl.stop_strings and all(isinstance(s, str) and s for s in tpl.stop_strings), path.name
        names.append(tpl.name)
    assert {"Hermes-2", "internvl2_5"} <= set(names) and len(set(names)) == len(files)


def test_from_dict_renders_the_json_layout() -> None:
    good = {"name": "x", "system_template": "S{system_message}", "system_message": "", "roles": {"user": "U", "assistant": "A"},
            "sep": "|\n", "label_sep": "|", "stop_strings": ["|"]}
    assert ChatTemplate.from_dict(good).render([{"role": "user", "content": "q"}]) == "S|\nUq|\nA"


def test_unknown_role_is_a_template_error_naming_the_message():
    tpl = get_template("Hermes-2")
    with pytest.raises(TemplateError, match=r"message 1: unknown role 'system'"):
        tpl.render([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])


@pytest.mark.parametrize(("content", "reason"), [
    ("{not json", "not a template file"),
    ('{"name": "x"}', "KeyError"),
    ('{"name": "x", "system_template": "S", "system_message": "", "roles": {"user": "U", "assistant": "A"}, '
     '"sep": "|\\n", "label_sep": "|", "stop_strings": ["|"]}', "system_message"),
    ('{"name": "x", "system_template": "{system_message}", "system_message": "", "roles": {"user": "U", '
     '"assistant": "A"}, "sep": "|\\n", "label_sep": "#", "stop_strings": ["|"]}', "label_sep must be a prefix"),
])
def test_a_bad_template_file_is_a_template_error_naming_it(tmp_path, content, reason) -> None:
    """A user-added ``templates/*.json`` that breaks the layout or the renderer's invariants names its file."""
    from internvl.templates import _load_file

    path = tmp_path / "mine.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TemplateError, match=rf"internvl/templates/mine\.json: .*{reason}"):
        _load_file(path)
