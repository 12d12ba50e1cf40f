"""Generated hostile records against every entry point that reads records, in process (cheap): `medrega-data check`
(strict and lenient), the training dataset (strict and lenient), `medrega-eval score`, the benchmark reader of
`medrega-eval run`, `src/demo.py --batch` and the converters. Each must name FILE:2 (an error or a counted skip),
keep lines 1 and 3, and never raise. test_zz_tally.py prints the tally (tries, clear, tracebacks, silent-wrong ...).
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from robust_io.hostile_cases import (
    TALLY,
    Case,
    annotation_cases,
    batch_cases,
    classify,
    prediction_cases,
    write_case,
)

BASE = {"id": "r1", "image": "imgs/a.png", "width": 32, "height": 24, "conversations": [
    {"from": "human", "value": "<image>\nWhere is <ref>the liver</ref>?"},
    {"from": "gpt", "value": "<ref>liver</ref><box>[[1, 2, 300, 400]]</box>"}]}
PRED = {"id": "p1", "prediction": "yes", "reference": "yes", "question": "is it?", "answer_type": "CLOSED",
        "image": "a.png", "hw": [24, 32]}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile")
    (root / "imgs").mkdir()
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(root / "imgs" / "a.png")
    return root


def _call(fn, *args, **kwargs):
    """(result, traceback text or None): an exception escaping an entry point is a traceback for the user."""
    try:
        return fn(*args, **kwargs), None
    except SystemExit as exc:
        return exc.code, None
    except BaseException:  # noqa: BLE001 - that is what we count
        return None, traceback.format_exc()


def _ids(cases: list[Case]) -> list[str]:
    return [c.name for c in cases]


ANNOTATION = annotation_cases()


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("case", ANNOTATION, ids=_ids(ANNOTATION))
def test_data_check(case: Case, strict: bool, root: Path, capsys) -> None:
    from internvl.data.cli import main

    f = write_case(root / f"check-{strict}.jsonl", case, BASE)
    args = ["check", str(f), "--image-root", str(root), "--images", "exists", *(["--strict"] if strict else [])]
    rc, tb = _call(main, args)
    out = capsys.readouterr().out
    problem_lines = [line for line in out.splitlines() if line.startswith(f"{f}:")]
    refused = rc == 1 and bool(problem_lines) and all(line.startswith(f"{f}:2: ") for line in problem_lines)
    kept = strict or case.valid or "1 of 3 record(s) bad" in out
    if case.valid:
        refused = rc != 0
    outcome = classify(case, refused_line_2=refused, kept_others=kept, traceback=tb is not None)
    assert outcome in ("clear", "accepted"), (outcome, tb, out[-2000:])


@pytest.mark.parametrize("strict", [False, True], ids=["lenient", "strict"])
@pytest.mark.parametrize("case", ANNOTATION, ids=_ids(ANNOTATION))
def test_training_dataset(case: Case, strict: bool, root: Path, tiny_tokenizer) -> None:
    from internvl.data.dataset import MedRegDataset
    from internvl.data.records import BadRecordError
    from internvl.data.registry import DatasetSpec

    f = write_case(root / f"train-{strict}.jsonl", case, BASE)
    spec = DatasetSpec(name="hostile", root=root, annotation=f)
    try:
        ds = MedRegDataset(spec, tiny_tokenizer, strict=strict, num_image_token=4, max_seq_length=None)
    except BadRecordError as exc:
        refused = str(exc).startswith(f"{f}:2: ")
        outcome = classify(case, refused_line_2=refused, kept_others=True, traceback=False)
        assert outcome == ("false_refusal" if case.valid else "clear"), (outcome, str(exc)[:500])
        return
    except BaseException:  # noqa: BLE001
        outcome = classify(case, refused_line_2=False, kept_others=True, traceback=True)
        raise
    refused = ds.tally.skipped == 1 and str(ds.tally.examples[next(iter(ds.tally.examples))]).startswith(f"{f}:2: ")
    kept = len(ds) == (3 if case.valid else 2)
    outcome = classify(case, refused_line_2=refused, kept_others=kept, traceback=False)
    assert outcome in ("clear", "accepted"), (outcome, ds.tally.summary())
    if case.valid:  # a control record is also encoded for training without error
        item = ds[1]
        assert item["input_ids"].numel() > 0


PREDICTIONS = prediction_cases()


@pytest.mark.parametrize("case", PREDICTIONS, ids=_ids(PREDICTIONS))
def test_eval_score(case: Case, root: Path, tmp_path: Path, capsys) -> None:
    from medrega_eval.cli import main

    f = write_case(tmp_path / "pred.jsonl", case, PRED)
    rc, tb = _call(main, ["score", "--task", "vqa", "--pred", str(f), "--out", str(tmp_path / "out")])
    capsys.readouterr()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text()) if rc == 0 else {}
    problems = summary.get("problems", [])
    refused = rc == 0 and any(p.startswith(f"{f}:2: ") for p in problems)
    scored = summary.get("num_samples")
    kept = scored == (3 if case.valid else 2)
    if case.valid:
        refused = bool(problems)
    outcome = classify(case, refused_line_2=refused, kept_others=kept, traceback=tb is not None)
    assert outcome in ("clear", "accepted"), (outcome, tb, problems[:3], scored)


@pytest.mark.parametrize("case", ANNOTATION, ids=_ids(ANNOTATION))
def test_eval_benchmark_reader(case: Case, root: Path, tmp_path: Path) -> None:
    from medrega_eval.benchmarks import load_registry, load_samples

    write_case(root / "bench.jsonl", case, BASE)
    yml = tmp_path / "b.yaml"
    yml.write_text("benchmarks:\n  hostile:\n    task: vqa\n    annotation: bench.jsonl\n")
    bench = load_registry([yml])["hostile"]
    result, tb = _call(load_samples, bench, root)
    samples, problems = (result[0], result[1]) if result else ([], [])
    refused = any(p.line == 2 for p in problems)
    kept = len(samples) == (3 if case.valid else 2)
    if case.valid:
        refused = bool(problems)
    outcome = classify(case, refused_line_2=refused, kept_others=kept, traceback=tb is not None)
    assert outcome in ("clear", "accepted"), (outcome, tb, [str(p) for p in problems][:3])


BATCH = batch_cases()


@pytest.mark.parametrize("case", BATCH, ids=_ids(BATCH))
def test_demo_batch(case: Case, root: Path, tmp_path: Path, capsys) -> None:
    import demo

    f = write_case(root / "batch.jsonl", case, BASE)
    rc, tb = _call(demo.main, ["--batch", str(f), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    if case.valid:  # the file is fine: it gets as far as loading the (missing) model, a one-line error
        refused = not (rc == 2 and len(err) == 1 and "model directory not found" in err[0])
    else:
        refused = rc == 2 and len(err) == 1 and f"{f}:2:" in err[0]
    outcome = classify(case, refused_line_2=refused, kept_others=True, traceback=tb is not None)
    assert outcome in ("clear", "accepted"), (outcome, tb, err[-3:])


VQA_ITEM = {"img_name": "a.png", "question": "is it normal?", "answer": "yes", "qid": "q1"}
CONVERT = [c for c in prediction_cases() if c.key in ("id", "extra", "image", "question", None)]


@pytest.mark.parametrize("case", CONVERT, ids=_ids(CONVERT))
def test_converter(case: Case, tmp_path: Path, capsys) -> None:
    from internvl.data.cli import main

    key = {"id": "qid", "image": "img_name"}.get(case.key, case.key)
    bad = Case(case.name, key, case.raw, case.valid).line(VQA_ITEM) if key else case.raw.encode("utf-8", "surrogatepass")
    good = json.dumps(VQA_ITEM).encode()
    src = tmp_path / "vqa.json"
    src.write_bytes(b"[" + good + b",\n" + bad + b",\n" + good.replace(b'"q1"', b'"q3"') + b"]")
    out = tmp_path / "out.jsonl"
    rc, tb = _call(main, ["convert", "vqa", str(src), "--out", str(out)])
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    whole_file = rc == 2 and len(err) == 1 and str(src) in err[0] and not out.exists()
    skipped = rc == 0 and "skipped 1" in cap.out and len(out.read_text().splitlines()) == 2
    outcome = classify(case, refused_line_2=whole_file or skipped, kept_others=True, traceback=tb is not None)
    assert outcome == "clear", (outcome, tb, cap.out[-500:], err[-3:])


META_CASES = [
    Case(f"repeat_time-{v}", "repeat_time", v) for v in ("1e300", "100001", "1e400", "NaN", '"3"', "true", "-1", "0")
] + [
    Case("root-component-300", "root", json.dumps("r" * 300)),
    Case("annotation-path-6000", "annotation", json.dumps("/".join(["d" * 200] * 30) + "/a.jsonl")),
    Case("length-5000-digits", "length", "7" * 5000),
    Case("base_prompt-depth", "base_prompt", "[" * 100_000 + "]" * 100_000),
    Case("base_prompt-surrogate", "base_prompt", '"a \\ud800"'),
    Case("repeat_time-3-ok", "repeat_time", "3", valid=True),
]


@pytest.mark.parametrize("case", META_CASES, ids=_ids(META_CASES))
def test_meta_file(case: Case, root: Path, tmp_path: Path, capsys) -> None:
    from internvl.data.cli import main

    ann = write_case(root / "meta-ann.jsonl", Case("ok", "id", '"x"', valid=True), BASE)
    entry = {"root": str(root), "annotation": str(ann)}
    meta = tmp_path / "meta.json"
    meta.write_bytes(b'{"ds": ' + case.line(entry) + b"}")
    rc, tb = _call(main, ["check", str(meta), "--images", "exists"])
    out = capsys.readouterr().out
    refused = rc == 1 and out.startswith(f"{meta}:")
    if case.valid:
        refused = rc != 0
    outcome = classify(case, refused_line_2=refused, kept_others=True, traceback=tb is not None)
    assert outcome in ("clear", "accepted"), (outcome, tb, out[-500:])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.characters(blacklist_categories=()), max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
record_keys = st.sampled_from(["id", "image", "width", "height", "conversations", "answer_type", "frame",
                               "slice_index", "prediction", "reference", "hw", "options", "lang", "question"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.dictionaries(record_keys, json_values, max_size=6))
def test_arbitrary_records_never_crash_a_reader(fields, root: Path, tmp_path_factory) -> None:
    """Any JSON object (any field, any type, any text incl. lone surrogates): every reader gives a result or a
    FILE:LINE problem, never an exception."""
    from internvl.data.records import RecordChecker, RecordProblem, read_jsonl
    from internvl.demo.batch import BatchError, read_batch_file
    from medrega_eval.io import read_predictions

    path = tmp_path_factory.mktemp("any") / "any.jsonl"
    path.write_bytes(json.dumps(fields, ensure_ascii=True).encode() + b"\n")
    TALLY["tries"] += 1
    (line, rec), = list(read_jsonl(path))
    if not isinstance(rec, RecordProblem):
        for p in RecordChecker(image_root=root, image_check="exists").check(rec, file=path, line=1):
            assert str(p).startswith(f"{path}:1: ")
    records, problems = read_predictions(path)
    assert len(records) + len(problems) == 1
    try:
        read_batch_file(path)
    except BatchError as exc:
        assert f"{path}" in str(exc)
    TALLY["clear" if isinstance(rec, RecordProblem) or problems else "random_record_read"] += 1
