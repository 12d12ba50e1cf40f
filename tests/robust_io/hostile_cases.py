"""Hostile record lines, generated, and the tally of what each entry point did with them.

A case is one JSON-lines file: a good record (line 1), the hostile line (line 2) and a good record (line 3). The
hostile line is the good record with one field replaced by raw JSON text from a generated family (numbers with
many digits, deep nesting, lone surrogates, over-long paths, wrong JSON types, non-finite numbers ...), or a raw
line that is not a record at all. Positive controls (odd but valid values) must be accepted.

Every entry point must, for every hostile line, name ``FILE:2`` (a strict error or a counted skip), keep lines 1 and
3, print no traceback and exit 2 when it stops. :data:`TALLY` counts the outcomes; ``test_zz_tally.py`` prints them.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

#: tries, clear (FILE:LINE error or counted skip), accepted (positive controls), traceback, silent_wrong,
#: false_refusal (a valid control refused), data_loss (an input or finished output changed).
TALLY: Counter = Counter()


@dataclass(frozen=True)
class Case:
    """One hostile (or control) line: ``name``, the field it replaces (None = the whole line), raw JSON text."""

    name: str
    key: str | None
    raw: str
    valid: bool = False  # a positive control: must be accepted

    def line(self, base: dict) -> bytes:
        if self.key is None:
            return self.raw.encode("utf-8", "surrogatepass")
        rest = {k: v for k, v in base.items() if k != self.key}
        if "id" in rest:  # its own id, so that a valid control is not a duplicate of line 1
            rest["id"] = f"{rest['id']}-2"
        text = json.dumps(rest, ensure_ascii=False)
        return (text[:-1] + f', "{self.key}": {self.raw}}}').encode("utf-8", "surrogatepass")


def _conv(question: str, answer: str = "the liver") -> str:
    """A conversation as raw JSON; ``\\uXXXX`` written in the texts stays a JSON escape (lone surrogates)."""
    text = json.dumps([{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
                      ensure_ascii=True)
    return text.replace("\\\\u", "\\u")


def number_cases(key: str) -> list[Case]:
    """Integers with 41 to 50 000 digits, and non-finite or huge floats."""
    cases = [Case(f"{key}-int-{n}-digits", key, "9" * n) for n in (41, 300, 4301, 50_000)]
    cases += [Case(f"{key}-float-{v}", key, v) for v in ("1e400", "-1e400", "NaN", "Infinity", "-Infinity")]
    cases.append(Case(f"{key}-float-{60}-chars", key, "1." + "3" * 60))
    return cases


def nesting_cases(key: str) -> list[Case]:
    """Nested lists/objects deeper than the limit (up to 200 000 levels: RecursionError territory)."""
    cases = [Case(f"{key}-list-depth-{d}", key, "[" * d + "]" * d) for d in (65, 1000, 200_000)]
    cases.append(Case(f"{key}-object-depth-5000", key, '{"a": ' * 5000 + "1" + "}" * 5000))
    return cases


def surrogate_cases() -> list[Case]:
    """Lone surrogates in the question, the answer and a key; a valid pair (an emoji) as control."""
    return [
        Case("lone-high-surrogate-question", "conversations", _conv("where is \\ud800 the liver?")),
        Case("lone-low-surrogate-answer", "conversations", _conv("where?", "liver \\udfff")),
        Case("lone-surrogate-end", "conversations", _conv("liver \\udbff")),
        Case("lone-surrogate-key", "extra", '{"\\ud800": 1}'),
        Case("surrogate-pair-emoji-ok", "conversations", _conv("where is the liver \\ud83d\\ude00?"), valid=True),
    ]


def path_cases(key: str = "image") -> list[Case]:
    """Image paths the file system cannot hold: a 256-byte and a 3000-byte component, a 6000-byte path, NUL."""
    cases = [Case(f"{key}-component-{n}", key, json.dumps("imgs/" + "a" * n + ".png")) for n in (256, 3000)]
    cases.append(Case(f"{key}-path-6000", key, json.dumps("/".join(["d" * 200] * 30) + "/x.png")))
    cases.append(Case(f"{key}-nul", key, json.dumps("imgs/a\u0000.png")))
    return cases


def wrong_type_cases(key: str, values: tuple[str, ...] = ('5', '{"a": 1}', '[1, 2]', 'true', '[]', '""')) -> list[Case]:
    return [Case(f"{key}-type-{v[:10]}", key, v) for v in values]


def line_cases() -> list[Case]:
    """Lines that are not records: not JSON objects, not UTF-8, a top-level 5000-digit number, 17 MB long."""
    return [
        Case("not-an-object-list", None, "[1, 2]"),
        Case("not-an-object-null", None, "null"),
        Case("top-level-5000-digits", None, "7" * 5000),
        Case("invalid-json", None, '{"id": 1, '),
        Case("not-utf8", None, '{"id": "\udcff"}'),
        Case("line-17MB", None, json.dumps({"id": 1, "pad": "x" * (17 * 1024 * 1024)})),
    ]


def annotation_cases() -> list[Case]:
    """Every hostile family for a MedRegInstruct annotation record."""
    return (number_cases("id") + number_cases("width") + nesting_cases("extra") + surrogate_cases() + path_cases()
            + wrong_type_cases("image") + wrong_type_cases("conversations", ('5', '{"a": 1}', '[1]', '"x"'))
            + [Case(f"box-{n}-digit-coordinate", "conversations",
                    _conv(f"what is <box>[[{'9' * n}, 1, 2, 3]]</box>?")) for n in (4, 4301, 50_000)]
            + [Case("box-ok-control", "conversations", _conv("what is <box>[[1, 2, 30, 40]]</box>?"), valid=True),
               Case("id-20-digits-ok", "id", "1" * 20, valid=True)]
            + line_cases())


def prediction_cases() -> list[Case]:
    """Hostile families for prediction records (`medrega-eval score`)."""
    return (number_cases("id") + nesting_cases("extra") + wrong_type_cases("answer_type", ('5', '{"a": 1}', '[1]', 'true'))
            + wrong_type_cases("image", ('5', '{"a": 1}', '[1, 2]', 'true')) + wrong_type_cases("prediction", ('5', '{"a": 1}', '[1]'))
            + wrong_type_cases("question", ('5', '[1]')) + number_cases("hw")
            + [Case("pred-lone-surrogate", "prediction", '"liver \\ud800"'),
               Case("ref-lone-surrogate", "reference", '"liver \\udc00"'),
               Case("pred-ok-control", "prediction", '"liver[[1, 2, 3, 4]]"', valid=True)]
            + line_cases())


def batch_cases() -> list[Case]:
    """Hostile families for `src/demo.py --batch` records (frame/slice_index/axis/window of the wrong type)."""
    return (annotation_cases()
            + wrong_type_cases("frame", ('"2"', '1.5', 'true', '-1', '[1]'))
            + wrong_type_cases("slice_index", ('"2"', '2.0', 'false', '-3', '{"a": 1}'))
            + wrong_type_cases("axis", ('"diagonal"', '5'))
            + wrong_type_cases("window", ('[1]', '["a", "b"]', '5', '[1, 2, 3]'))
            + [Case("window-preset-ok", "window", '"lung"', valid=True)])


def write_case(path: Path, case: Case, base: dict) -> Path:
    """good, hostile, good: the file of one case."""
    good = json.dumps(base, ensure_ascii=False).encode("utf-8")
    other = json.dumps({**base, "id": f"{base['id']}-b"}, ensure_ascii=False).encode("utf-8")
    path.write_bytes(good + b"\n" + case.line(base) + b"\n" + other + b"\n")
    return path


def classify(case: Case, *, refused_line_2: bool, kept_others: bool, traceback: bool) -> str:
    """Count one outcome in :data:`TALLY` and return it."""
    TALLY["tries"] += 1
    if traceback:
        outcome = "traceback"
    elif not kept_others:
        outcome = "data_loss"
    elif case.valid:
        outcome = "false_refusal" if refused_line_2 else "accepted"
    else:
        outcome = "clear" if refused_line_2 else "silent_wrong"
    TALLY[outcome] += 1
    return outcome


def tree_digest(path: Path) -> dict[str, bytes]:
    """{relative path: content} of every file under ``path`` (or of ``path`` itself): to prove nothing changed."""
    path = Path(path)
    if path.is_file():
        return {".": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def classify_refusal(*, refused: bool, intact: bool, traceback: bool) -> str:
    """Count one refused-output-path try in :data:`TALLY` (output paths, CLI numbers, missing directories)."""
    TALLY["tries"] += 1
    outcome = "traceback" if traceback else "data_loss" if not intact else "clear" if refused else "silent_wrong"
    TALLY[outcome] += 1
    return outcome
