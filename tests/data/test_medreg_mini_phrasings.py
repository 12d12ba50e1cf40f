"""MedReg-mini's training phrasings (issue #17): the compositional grammar gives hundreds of templates per family and
language, sampling is seeded, and no training template is a held-out one (paraphrase_heldout.yaml) after
normalisation (case, whitespace, final punctuation) - nor one that a held-out template's pattern matches."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from internvl.data.prompts import load_prompts
from scripts import medreg_mini_grammar as grammar
from scripts import medreg_mini_userturns as user

FAMILIES = ("locate", "choice", "vqa.modality", "vqa.body_part", "vqa.plane")


def test_normalise_ignores_case_whitespace_and_final_punctuation() -> None:
    assert grammar.normalise("  Mark {ref}   on this IMAGE!") == grammar.normalise("mark {ref} on this image.")
    assert grammar.normalise("把{name}框出来。") == grammar.normalise("把{name}框出来") == "把{name}框出来"
    assert grammar.normalise("Where is {name}?") != grammar.normalise("Where is the {name}?")


def test_training_grammar_has_hundreds_of_templates_per_family_and_language() -> None:
    train, _ = user.load_training_phrasings()
    counts = {(f, ln): len(train.templates(f, ln)) for f in FAMILIES for ln in user.LANGS}
    assert all(counts[("locate", ln)] >= 1000 for ln in user.LANGS), counts
    assert all(n >= 100 for n in counts.values()), counts
    # the hand-written lists of user_phrasings.yaml are still there
    hand, _ = user.load_phrasings(user.TRAIN_PHRASINGS)
    assert hand.all_templates() <= train.all_templates()
    # locate templates carry an object, choice templates their options, VQA templates no field at all
    assert all("{name}" in t or "{ref}" in t for ln in user.LANGS for t in train.templates("locate", ln))
    assert all("{options}" in t for ln in user.LANGS for t in train.templates("choice", ln))
    assert not [t for f in FAMILIES[2:] for ln in user.LANGS for t in train.templates(f, ln) if "{" in t]


def test_no_training_template_is_a_heldout_template() -> None:
    train, _ = user.load_training_phrasings()
    held = user.load_phrasings(user.HELDOUT_PHRASINGS)[0].all_templates()
    registry: set[str] = set()
    for tp in load_prompts().values():
        qs = tp.questions
        for value in (qs.values() if isinstance(qs, dict) else [qs]):
            registry.update(value)
    training = train.all_templates() | registry
    assert len(held) >= 20 and len(training) > 10_000
    norm_held = {grammar.normalise(h) for h in held}
    assert not [t for t in training if grammar.normalise(t) in norm_held]
    # and no training template contains a held-out one (its fields read as any text)
    for h in held:
        pattern = grammar.heldout_pattern(h)
        assert not [t for t in training if pattern.search(grammar.normalise(t))], h


def test_the_raw_grammar_does_produce_heldout_lookalikes_that_the_exclusion_drops() -> None:
    """The check above is not vacuous: without the exclusion the grammar yields some held-out templates."""
    held = user.load_phrasings(user.HELDOUT_PHRASINGS)[0].all_templates()
    raw = grammar.load_grammar(user.GRAMMAR, [])
    produced = {t for f in FAMILIES for ln in user.LANGS for g in raw[f][ln] for t in g}
    matches = grammar.heldout_matcher(held)
    assert {t for t in produced if matches(t)}


def _write_grammar(path: Path, locate_en_frames: list[str], vqa_plane_en: str = "Which plane?") -> Path:
    lines = []
    for family in FAMILIES:
        lines.append(f"{family}:")
        for ln in user.LANGS:
            frames = {"locate": locate_en_frames if ln == "en" else ["找到{name}<end>"],
                      "choice": ["<pick> {options}"], "vqa.plane": [vqa_plane_en]}.get(family, ["What is it?"])
            lines += [f"  {ln}:", "    slots:", "      end: ['。', '']", "      pick: [Pick, Choose]",
                      "      verb: [mark, find]", "      obj: ['{ref}', 'the {name}']", "    frames:"]
            lines += [f"      - {f!r}" for f in frames]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_exclusion_drops_case_space_punctuation_and_pattern_variants(tmp_path: Path) -> None:
    path = _write_grammar(tmp_path / "g.yaml", ["<verb>  <obj> on this image!", "<verb> <obj> on this scan"])
    out = grammar.load_grammar(path, ["Mark {ref} on this image."])
    kept = {t for g in out["locate"]["en"] for t in g}
    # "mark  {ref} on this image!" (normalised equal) and "Mark the {name} on this image!" (pattern) are gone
    assert kept == {"Find {ref} on this image!", "Find the {name} on this image!", "Mark {ref} on this scan",
                    "Mark the {name} on this scan", "Find {ref} on this scan", "Find the {name} on this scan"}
    assert {t for g in out["locate"]["zh"] for t in g} == {"找到{name}。", "找到{name}"}
    assert {t for g in out["choice"]["en"] for t in g} == {"Pick {options}", "Choose {options}"}


@pytest.mark.parametrize(("frames", "plane", "message"), [
    (["<verb> <nothing>"], "Which plane?", r"g\.yaml: locate\.en: .*undefined slot"),
    (["<verb> it"], "Which plane?", r"g\.yaml: locate\.en: .*names no object"),
    (["<verb> <obj>"], "Which plane is {name}?", r"g\.yaml: vqa\.plane\.en: .*uses \['name'\]"),
])
def test_grammar_errors_name_the_file_and_family(tmp_path: Path, frames: list[str], plane: str, message: str) -> None:
    with pytest.raises(grammar.GrammarError, match=message):
        grammar.load_grammar(_write_grammar(tmp_path / "g.yaml", frames, plane), [])


def test_sampling_is_seeded_and_reaches_every_frame() -> None:
    _, raw = user.load_phrasings(user.TRAIN_PHRASINGS)

    def draws(seed: int) -> list[str]:
        maker = user.make_maker(user.TRAIN_PHRASINGS, random.Random(seed), raw)
        return [maker.pick(maker.phr.locate["en"]) for _ in range(3000)]

    first = draws(0)
    assert first == draws(0) and first != draws(1)
    groups = user.load_training_phrasings()[0].locate["en"]
    hit = {k for k, g in enumerate(groups) for t in set(first) if t in g}
    assert hit == set(range(len(groups)))  # every frame (and the hand-written list) is drawn
    assert len(set(first)) > 1500  # draws spread over the templates, not a few favourites
