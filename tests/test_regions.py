"""Tests for internvl.regions: the box grammar (parse/format/validate/convert/strip), incl. hypothesis round trips."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from internvl.regions import (
    Box,
    Region,
    RegionError,
    box_to_pixels,
    format_boxes,
    format_region,
    format_regions,
    has_regions,
    map_boxes,
    parse_box_list,
    parse_original_references,
    parse_regions,
    pixels_to_box,
    remove_box_text_original,
    remove_region_tags,
    scan_box_lists,
    strip_regions,
    validate_box,
)

# --------------------------------------------------------------------------------------------------- examples
GROUNDED = ("<ref>right lung</ref><box>[[102, 106, 481, 910]]</box>, <ref>left lung</ref><box>[[535, 128, 923, 889]]</box>"
            ": No focal consolidation, pleural effusion, or pneumothorax is seen.")


def test_parse_multi_box_single_object() -> None:
    text = "<ref>carotid vessel wall</ref><box>[[365, 293, 416, 598], [596, 316, 635, 464]]</box>"
    assert parse_regions(text) == [Region("carotid vessel wall", [Box(365, 293, 416, 598), Box(596, 316, 635, 464)])]


def test_parse_multi_object_grounded_report() -> None:
    assert parse_regions(GROUNDED) == [Region("right lung", [Box(102, 106, 481, 910)]),
                                       Region("left lung", [Box(535, 128, 923, 889)])]


def test_parse_box_without_ref_and_ref_without_box() -> None:
    assert parse_regions("What is <box>[[421, 351, 505, 470]]</box> in this CT scan?") == [
        Region(None, [Box(421, 351, 505, 470)])]
    assert parse_regions("Please locate <ref>carotid vessel wall</ref> in this MRI scan.") == [
        Region("carotid vessel wall", [])]


def test_parse_ref_separated_from_box_by_words() -> None:
    text = "The region of <ref>brain tumor</ref> is <box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box>"
    assert parse_regions(text) == [Region("brain tumor", [Box(1, 2, 3, 4), Box(5, 6, 7, 8)])]
    # a second <ref> before the box takes the box; the first stays box-less
    text = "<ref>a</ref> and <ref>b</ref><box>[[1, 2, 3, 4]]</box>"
    assert parse_regions(text) == [Region("a", []), Region("b", [Box(1, 2, 3, 4)])]


def test_parse_tag_stripped_forms() -> None:
    assert parse_regions("carotid vessel wall[[365, 293, 416, 598], [596, 316, 635, 464]]") == [
        Region("carotid vessel wall", [Box(365, 293, 416, 598), Box(596, 316, 635, 464)])]
    decoded = "right lung[[102, 106, 481, 910]], left lung[[535, 128, 923, 889]]: No focal consolidation."
    assert parse_regions(decoded) == [Region("right lung", [Box(102, 106, 481, 910)]),
                                      Region("left lung", [Box(535, 128, 923, 889)])]
    assert parse_regions("胰腺癌[[661, 528, 743, 599]]：胰尾部见一稍低密度肿块") == [Region("胰腺癌", [Box(661, 528, 743, 599)])]
    assert parse_regions("[[1, 2, 3, 4]]") == [Region(None, [Box(1, 2, 3, 4)])]
    assert parse_regions("no boxes here") == []


def test_format_exact_strings() -> None:
    assert format_boxes([Box(1, 2, 3, 4), [5, 6, 7, 8]]) == "[[1, 2, 3, 4], [5, 6, 7, 8]]"
    assert format_region("liver", [Box(0, 0, 999, 999)]) == "<ref>liver</ref><box>[[0, 0, 999, 999]]</box>"
    assert format_region(None, [Box(1, 1, 2, 2)]) == "<box>[[1, 1, 2, 2]]</box>"
    assert format_region("liver", []) == "<ref>liver</ref>"
    regions = parse_regions(GROUNDED)
    assert format_regions(regions) == GROUNDED.split(":")[0]
    with pytest.raises(RegionError):
        format_boxes([])
    with pytest.raises(RegionError):
        format_region("a<ref>b", [Box(1, 1, 2, 2)])


@pytest.mark.parametrize(
    "values, message",
    [
        ([5, 0, 1, 9], "x1=5 > x2=1"),
        ([0, 9, 1, 2], "y1=9 > y2=2"),
        ([0, 0, 1000, 5], "outside 0..999"),
        ([-1, 0, 5, 5], "outside 0..999"),
        ([1, 2, 3], "exactly 4 values"),
        ([1, 2, 3, 4, 5], "exactly 4 values"),
        ([1.5, 2, 3, 4], "not an integer"),
        ([True, 2, 3, 4], "not an integer"),
        ("1234", "sequence of 4 integers"),
    ],
)
def test_validate_box_errors(values, message) -> None:
    with pytest.raises(RegionError, match=re.escape(message)):
        validate_box(values)


def test_box_constructor_validates() -> None:
    with pytest.raises(RegionError):
        Box(10, 0, 5, 5)
    assert validate_box([0, 0, 0, 0]) == Box(0, 0, 0, 0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("<box>[[1, 2, 3]]</box>", "exactly 4 values"),
        ("<box>[[9, 2, 3, 4]]</box>", "x1=9 > x2=3"),
        ("<box>[[1, 2, 3, 1000]]</box>", "outside"),
        ("<box>[[1.0, 2, 3, 4]]</box>", "not an integer"),
        ("<box>[[a, 2, 3, 4]]</box>", "not a number"),
        ("<box>1, 2, 3, 4</box>", "not a box list"),
        ("<ref>liver</ref><box>[[1, 2, 3, 4]]", "unbalanced"),
        ("liver[[1, 2, 3]]", "exactly 4 values"),
    ],
)
def test_parse_strict_errors(text, message) -> None:
    with pytest.raises(RegionError, match=re.escape(message)):
        parse_regions(text)


def test_parse_lenient_reports_every_problem() -> None:
    errors: list[str] = []
    text = "<ref>a</ref><box>[[1, 2, 3]]</box>, <ref>b</ref><box>[[1, 2, 3, 4]]</box>, <box>[[5, 5, 1, 1]]</box>"
    regions = parse_regions(text, strict=False, errors=errors)
    assert regions == [Region("a", []), Region("b", [Box(1, 2, 3, 4)])]
    assert len(errors) == 2 and "exactly 4 values" in errors[0] and "x1=5 > x2=1" in errors[1]


def test_parse_box_list_rejects_garbage() -> None:
    with pytest.raises(RegionError):
        parse_box_list("[1, 2, 3, 4]")
    assert parse_box_list(" [[1,2,3,4],[5, 6 , 7,8]] ") == [Box(1, 2, 3, 4), Box(5, 6, 7, 8)]


def test_pixel_conversion_documented_rounding() -> None:
    # forward: round half up of p / W * 999, clamped
    assert pixels_to_box((0, 0, 512, 512), 512, 512) == Box(0, 0, 999, 999)
    assert pixels_to_box((-3, -1, 600, 520), 512, 512) == Box(0, 0, 999, 999)
    assert pixels_to_box((1, 1, 2, 2), 1998, 1998) == Box(1, 1, 1, 1)  # 0.5 rounds up
    # backward: v / 999 * W, as the original evaluators
    assert box_to_pixels(Box(999, 0, 999, 999), 432, 300) == (432.0, 0.0, 432.0, 300.0)
    x1, y1, _, _ = box_to_pixels([365, 293, 416, 598], 432, 432)
    assert x1 == pytest.approx(365 / 999 * 432) and y1 == pytest.approx(293 / 999 * 432)
    with pytest.raises(RegionError):
        pixels_to_box((5, 0, 1, 1), 10, 10)
    with pytest.raises(RegionError):
        pixels_to_box((0, 0, 1, 1), 0, 10)
    with pytest.raises(RegionError):
        pixels_to_box((0, 0, float("nan"), 1), 10, 10)


def test_strip_regions() -> None:
    assert strip_regions(GROUNDED) == "No focal consolidation, pleural effusion, or pneumothorax is seen."
    assert strip_regions("<ref>胰腺癌</ref><box>[[661, 528, 743, 599]]</box>：胰尾部见一稍低密度肿块") == "胰尾部见一稍低密度肿块"
    assert strip_regions("right lung[[1, 2, 3, 4]], left lung[[5, 6, 7, 8]]: clear.\nheart[[1, 1, 2, 2]]: normal size.") == (
        "clear.\nnormal size.")
    assert strip_regions("What is <box>[[1, 2, 3, 4]]</box> in this CT scan?") == "What is in this CT scan?"
    assert strip_regions("Please locate <ref>liver</ref> here.") == "Please locate liver here."
    assert strip_regions("plain text, no regions: kept.") == "plain text, no regions: kept."
    assert has_regions(GROUNDED) and not has_regions("plain [1] text")


# --------------------------------------------------------------------------------------------------- properties
coords = st.integers(min_value=0, max_value=999)


@st.composite
def boxes(draw) -> Box:
    x1, x2 = sorted((draw(coords), draw(coords)))
    y1, y2 = sorted((draw(coords), draw(coords)))
    return Box(x1, y1, x2, y2)


names = st.text(alphabet=st.characters(blacklist_characters="<>[]\n,;:.，；：。、", blacklist_categories=("Cs", "Cc")),
                min_size=1, max_size=20).map(str.strip).filter(bool)
regions_st = st.lists(st.builds(Region, names, st.lists(boxes(), min_size=1, max_size=4)), min_size=1, max_size=4)


@given(st.lists(boxes(), min_size=1, max_size=6))
def test_box_list_round_trip(bs: list[Box]) -> None:
    assert parse_box_list(format_boxes(bs)) == bs


@given(regions_st)
def test_tagged_and_stripped_round_trip(regions: list[Region]) -> None:
    text = format_regions(regions)
    assert parse_regions(text) == regions
    # decoding with skip_special_tokens removes exactly the four tags
    stripped = re.sub(r"</?(ref|box)>", "", text)
    assert parse_regions(stripped) == regions


@given(regions_st, st.text(alphabet="abc xyz", min_size=1, max_size=30).map(str.strip).filter(bool))
def test_strip_regions_leaves_only_text(regions: list[Region], description: str) -> None:
    text = format_regions(regions) + ": " + description
    assert strip_regions(text) == description


@given(boxes(), st.integers(1, 5000), st.integers(1, 5000))
def test_box_pixels_box_is_identity(box: Box, width: int, height: int) -> None:
    assert pixels_to_box(box_to_pixels(box, width, height), width, height) == box


@settings(max_examples=200)
@given(st.integers(1, 5000), st.integers(1, 5000), st.data())
def test_pixels_box_pixels_error_is_half_a_step(width: int, height: int, data) -> None:
    xs = sorted(data.draw(st.lists(st.floats(0, width), min_size=2, max_size=2)))
    ys = sorted(data.draw(st.lists(st.floats(0, height), min_size=2, max_size=2)))
    back = box_to_pixels(pixels_to_box((xs[0], ys[0], xs[1], ys[1]), width, height), width, height)
    for got, want, size in zip(back, (xs[0], ys[0], xs[1], ys[1]), (width, height, width, height)):
        assert abs(got - want) <= size / 999 / 2 + 1e-9 * size


def test_map_boxes_rewrites_numeric_boxes_only() -> None:
    text = ('Format: "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>". '
            "<ref>a</ref><box>[[1, 2, 3, 4],[5,6,7,8]]</box>, b[[0, 0, 9, 9]]: done")
    shifted = map_boxes(text, lambda b: Box(b.x1 + 1, b.y1, b.x2 + 1, b.y2))
    assert shifted == ('Format: "<ref>object</ref><box>[[x1, y1, x2, y2]]</box>". '
                       "<ref>a</ref><box>[[2, 2, 4, 4], [6, 6, 8, 8]]</box>, b[[1, 0, 10, 9]]: done")
    with pytest.raises(RegionError, match="exactly 4 values"):
        map_boxes("<box>[[1, 2, 3]]</box>", lambda b: b)


@given(regions_st)
def test_map_boxes_identity_keeps_formatted_text(regions: list[Region]) -> None:
    text = format_regions(regions) + ": text"
    assert map_boxes(text, lambda b: b) == text


# ------------------------------------------------------------------ hostile input, original grammar, tag removal
def test_full_width_digits_are_not_a_box() -> None:
    errors: list[str] = []
    assert parse_regions("liver[[５,10,100,200]]", strict=False, errors=errors) == []
    assert errors and "ASCII" in errors[0]
    with pytest.raises(RegionError):
        parse_box_list("[[１, 2, 3, 4]]")
    assert map_boxes("a[[５, 1, 2, 3]]", lambda b: b) == "a[[５, 1, 2, 3]]"  # not rewritten: not a box
    with pytest.raises(RegionError, match="outside"):
        parse_box_list("[[" + "9" * 5000 + ", 1, 2, 3]]")  # no 4300-digit int() parsing


@pytest.mark.parametrize("line", [
    "<ref>" * 200_000, "<box>" * 200_000, "<ref>a</ref>" * 80_000, "a" * 1_000_000, "word " * 200_000,
    "[[" * 500_000, "[ " * 500_000, "[[1, 2, 3, 4], " * 60_000, "[[" + "1" * 1_000_000,
    "<ref>a</ref><box>" * 55_000, "a[[1,2,3,4]" * 90_000, "x[[1, 2, 3, 4]], " * 58_000,
])
def test_parsing_a_1mb_line_is_linear(line: str) -> None:
    """Every parser of the module on a 1 MB hostile line (the old lazy patterns took 25 s on 100 KB of "<ref>")."""
    import time

    start = time.perf_counter()
    parse_regions(line, strict=False, errors=[])
    strip_regions(line)
    has_regions(line)
    scan_box_lists(line, "original")
    parse_original_references(line)
    remove_region_tags(line)
    assert time.perf_counter() - start < 8.0  # ~0.1-1 s here; generous for loaded CI machines, far from quadratic


def test_original_grammar_and_names() -> None:
    text = "liver[[1, 2, 3, 4]], kidney[[5, 6, 7, 8],[9, 9, 9, 9]] x[[ 1, 2, 3, 4]] [[1 ,2, 3, 4]] y[[01, 2, 3, 4]]"
    spans = scan_box_lists(text, "original")
    assert [s.name for s in spans] == ["liver", ", kidney", " y"]  # spaced lists are not boxes in this grammar
    assert spans[1].values == ((5, 6, 7, 8), (9, 9, 9, 9))
    assert spans[2].values is None and "leading zeros" in spans[2].error
    assert scan_box_lists("a[[1, 2, 3, 1500]]", "original")[0].values == ((1, 2, 3, 1500),)  # no range check
    assert scan_box_lists("a[[５,10,100,200]]", "original")[0].error  # literal_eval refuses full-width digits
    assert [s.name for s in scan_box_lists(text, "tolerant")] == ["liver", "kidney", "x", "", "y"]


def test_original_reference_rule() -> None:
    assert parse_original_references("<ref>a</ref> and <ref>b</ref><box>[[1, 2, 3, 4]]</box>, <box>[[5, 5, 6, 6]]</box>"
                                     ) == [("a</ref> and <ref>b", "[[1, 2, 3, 4]]")]
    assert parse_original_references("<ref>a</ref>\n<ref>b</ref><box>[[1, 2, 3, 4]]</box>") == [("b", "[[1, 2, 3, 4]]")]


def test_remove_region_tags() -> None:
    assert remove_region_tags("<ref>a</ref><box>[[1, 2, 3, 4]]</box>, <ref>b</ref><box>[[5, 6, 7, 8]]</box>") == (
        "a[[1, 2, 3, 4]], b[[5, 6, 7, 8]]")
    assert remove_region_tags("What is <box>[[1, 2, 3, 4]]</box>?") == "What is [[1, 2, 3, 4]]?"


def test_remove_box_text_original_equals_the_pattern() -> None:
    import random

    rnd = random.Random(0)
    for _ in range(3000):
        text = "".join(rnd.choice(["[[", "]]", "[", "]", "a", " ", "\n", "1, 2"]) for _ in range(rnd.randint(0, 14)))
        assert remove_box_text_original(text) == re.sub(r"\[\[.*?\]\]", "", text), text
    import time

    start = time.perf_counter()
    remove_box_text_original("[[" * 500_000 + "\n]]")
    assert time.perf_counter() - start < 5.0


def test_original_grammar_reads_like_literal_eval() -> None:
    """The original grammar's reader agrees with ast.literal_eval (what the original scorer calls) on every list."""
    import ast
    import random

    rnd = random.Random(0)
    for _ in range(3000):
        nums = [rnd.choice(["0", "00", "01", "7", "999", "1000", "000", "12", "9" * 4300, "9" * 4301])
                for _ in range(4 * rnd.randint(1, 3))]
        text = "x[" + ", ".join("[" + ", ".join(nums[k:k + 4]) + "]" for k in range(0, len(nums), 4)) + "]"
        (span,) = scan_box_lists(text, "original")
        try:
            expected = tuple(tuple(b) for b in ast.literal_eval(text[1:]))
        except (SyntaxError, ValueError):
            expected = None
        assert span.values == expected
