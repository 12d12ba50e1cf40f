"""Every console script: out-of-range numbers are usage errors (exit 2), missing model/tokenizer directories and
other expected failures are one line on stderr with exit 2, and a bug still shows its traceback."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from internvl.cli_support import run_cli
from robust_io.hostile_cases import classify_refusal

REPO = Path(__file__).resolve().parents[2]
HUGE = "9" * 5000


def _main(name: str):
    if name == "medrega-data":
        from internvl.data.cli import main
    elif name == "medrega-eval":
        from medrega_eval.cli import main
    elif name == "medrega-train":
        from internvl.train.cli import main
    elif name == "demo":
        import demo

        main = demo.main
    elif name == "merge_lora":
        from internvl.train.merge_lora import main
    else:
        from internvl.model.convert_hf import main
    return main


def _run(name: str, argv: list[str], capsys) -> tuple[int | None, list[str], bool]:
    try:
        rc, tb = _main(name)(argv), False
    except SystemExit as exc:
        rc, tb = exc.code, False
    except Exception:  # noqa: BLE001
        rc, tb = None, True
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "Warning" not in line]
    return rc, err, tb


BAD_NUMBERS = [
    ("medrega-data", ["check", "x.jsonl", "--max-length", v]) for v in ("-5", "0", "abc", HUGE, "nan")
] + [
    ("medrega-data", ["convert", "vqa", "a.json", "--out", "o.jsonl", "--max-print", "-2"]),
] + [
    ("medrega-eval", ["run", "--model", "m", "--benchmark", "b", "--out", "o", flag, v])
    for flag, v in (("--max-new-tokens", "0"), ("--limit", "-3"), ("--limit", "0"), ("--batch-size", "0"),
                    ("--num-beams", "-1"), ("--temperature", "-1"), ("--temperature", "nan"),
                    ("--temperature", "inf"), ("--max-new-tokens", HUGE))
] + [
    ("demo", [flag, v]) for flag, v in (("--max-new-tokens", "0"), ("--port", "0"), ("--port", "70000"),
                                        ("--batch-size", "-1"), ("--temperature", "nan"), ("--num-beams", "0"))
] + [
    ("medrega-train", ["--preset", "tiny", "--tokenizer_path", "t", "--meta_path", "m.json", "--output_dir", "o",
                       flag, v])
    for flag, v in (("--max_seq_length", "-5"), ("--learning_rate", "-1"), ("--learning_rate", "nan"),
                    ("--lora_dropout", "1.5"), ("--per_device_train_batch_size", "0"),
                    ("--gradient_accumulation_steps", "0"), ("--max_dynamic_patch", "0"))
] + [
    ("convert_to_hf", ["a", "b", "--image-token-id", "-1"]),
]


@pytest.mark.parametrize("name,argv", BAD_NUMBERS, ids=[f"{n}:{' '.join(a[-2:])[:30]}" for n, a in BAD_NUMBERS])
def test_out_of_range_numbers_are_usage_errors(name: str, argv: list[str], capsys) -> None:
    rc, err, tb = _run(name, argv, capsys)
    # argparse: the usage (possibly wrapped) then one "error:" line; our own checks: one "error:" line
    outcome = classify_refusal(refused=rc == 2 and bool(err) and "error:" in err[-1], intact=True, traceback=tb)
    assert outcome == "clear", (rc, err)
    assert "Traceback" not in "\n".join(err)


def test_missing_tokenizer_and_model_directories_are_one_line(tmp_path: Path, capsys) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": 1, "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "gpt", "value": "a"}]}) + "\n")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "v.jsonl").write_text(data.read_text())
    yml = tmp_path / "b.yaml"
    yml.write_text("benchmarks:\n  t:\n    task: vqa\n    annotation: v.jsonl\n")
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"d": {"root": str(tmp_path), "annotation": str(data)}}))
    before = set(Path(tempfile.gettempdir()).glob("medrega-demo-uploads-*"))
    cases = [
        ("medrega-data", ["check", str(data), "--max-length", "10", "--tokenizer", "/nonexist"], "/nonexist"),
        ("medrega-data", ["check", str(data), "--max-length", "10"], "--tokenizer"),
        ("medrega-eval", ["run", "--model", "/nonexist", "--benchmark", "t", "--benchmark-file", str(yml),
                          "--data-dir", str(tmp_path / "bench"), "--out", str(tmp_path / "o")], "/nonexist"),
        ("medrega-eval", ["score", "--task", "vqa", "--pred", str(tmp_path / ("n" * 300)), "--out",
                          str(tmp_path / "o2")], "prediction file"),
        ("medrega-eval", ["score", "--benchmark", "nope", "--pred", str(data), "--out", str(tmp_path / "o3")],
         "unknown benchmark"),
        ("demo", ["--model", "/nonexist"], "/nonexist"),
        ("demo", ["--batch", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o4")], "not found"),
        ("medrega-train", ["--preset", "tiny", "--tokenizer_path", "/nonexist", "--meta_path", str(meta),
                           "--output_dir", str(tmp_path / "run"), "--max_steps", "1", "--report_to", "none"],
         "/nonexist"),
        ("medrega-train", ["--model_name_or_path", "/nonexist", "--meta_path", str(meta),
                           "--output_dir", str(tmp_path / "run2"), "--max_steps", "1", "--report_to", "none"],
         "/nonexist"),
        ("merge_lora", ["--run_dir", "/nonexist", "--output_dir", str(tmp_path / "m")], "/nonexist"),
        ("convert_to_hf", ["/nonexist", str(tmp_path / "hf")], "/nonexist"),
    ]
    failures = []
    for name, argv, needle in cases:
        rc, err, tb = _run(name, argv, capsys)
        errors = [line for line in err if not line.startswith(("INFO", "20"))]  # log lines of the demo
        outcome = classify_refusal(refused=rc == 2 and len(errors) == 1 and needle in errors[0], intact=True,
                                   traceback=tb)
        if outcome != "clear":
            failures.append((name, argv, rc, errors[-3:]))
    assert not failures, failures
    assert set(Path(tempfile.gettempdir()).glob("medrega-demo-uploads-*")) == before  # the demo's upload folder went


def test_bugs_keep_their_traceback(capsys) -> None:
    def buggy(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        run_cli("x", buggy, [])

    def expected(argv):
        from internvl.io_safety import OutputPathError

        raise OutputPathError("first line\nsecond line")

    assert run_cli("x", expected, []) == 2
    assert capsys.readouterr().err == "x: error: first line; second line\n"


def test_os_errors_about_named_files_are_one_line(tmp_path: Path, capsys) -> None:
    rc, err, tb = _run("medrega-eval", ["score", "--task", "vqa", "--pred", str(tmp_path / ("n" * 300)), "--out",
                                        str(tmp_path / "o")], capsys)
    outcome = classify_refusal(refused=rc == 2 and len(err) == 1 and "File name too long" in err[0], intact=True,
                               traceback=tb)
    assert outcome == "clear", (rc, err)
