"""Output paths: every writer refuses an output equal to, inside or around its input, a file where a directory is
needed and a non-empty directory without --overwrite -- before any work, in one line with exit 2 -- and writes
through a temporary name, so nothing is overwritten or lost. Each refusal also proves the input is byte-identical."""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from internvl.io_safety import OutputPathError, atomic_write_text, check_output_dir, check_output_file, \
    staged_output_dir, unique_file
from robust_io.hostile_cases import classify_refusal, tree_digest

REPO = Path(__file__).resolve().parents[2]


def _script(name: str):
    """The main of the console script `medrega-merge-lora` (NAME merge_lora) or `medrega-convert-hf` (convert_to_hf)."""
    from internvl.model import convert_hf
    from internvl.train import merge_lora

    return {"merge_lora": merge_lora.main, "convert_to_hf": convert_hf.main}[name]


def _expect_refusal(fn, argv, protected: list[Path], capsys, needle: str = "") -> None:
    before = {str(p): tree_digest(p) for p in protected}
    try:
        rc, tb = fn(argv), False
    except SystemExit as exc:
        rc, tb = exc.code, False
    except Exception:  # noqa: BLE001
        rc, tb = None, True
    err = capsys.readouterr().err.strip().splitlines()
    intact = all(tree_digest(p) == before[str(p)] for p in protected)
    refused = rc == 2 and len(err) == 1 and needle in err[0]
    outcome = classify_refusal(refused=refused, intact=intact, traceback=tb)
    assert outcome == "clear", (outcome, rc, err)


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights" * 10)
    (base / "config.json").write_text("{}")
    return base


def test_check_output_dir_rules(tmp_path: Path, base_dir: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(base_dir, target_is_directory=True)
    afile = tmp_path / "f.txt"
    afile.write_text("x")
    for out, why in [(base_dir, "is the input"), (link, "is the input"), (base_dir / "sub", "inside the input"),
                     (tmp_path, "contains the input"), (afile, "is a file"), (afile / "sub", "is a file")]:
        with pytest.raises(OutputPathError, match=why):
            check_output_dir(out, inputs=[base_dir])
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("old")
    with pytest.raises(OutputPathError, match="not empty; pass --overwrite"):
        check_output_dir(full)
    assert check_output_dir(full, overwrite=True) == full
    assert check_output_dir(tmp_path / "new" / "dir", inputs=[base_dir]) == tmp_path / "new" / "dir"
    with pytest.raises(OutputPathError):
        check_output_dir(tmp_path / ("n" * 300))  # a name the file system cannot hold: one line, no OSError
    with pytest.raises(OutputPathError, match="is the input"):
        check_output_file(base_dir / "config.json", inputs=[base_dir / "config.json"], overwrite=True)
    with pytest.raises(OutputPathError, match="exists"):
        check_output_file(afile)


def test_staged_output_dir_keeps_the_old_result_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("finished work")
    with pytest.raises(RuntimeError):
        with staged_output_dir(final, overwrite=True) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("crash in the middle")
    assert tree_digest(final) == {"old.txt": b"finished work"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind
    with staged_output_dir(final, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert tree_digest(final) == {"new.txt": b"new"}
    with pytest.raises(OutputPathError):  # filled up meanwhile and no --overwrite: the new result is not moved
        with staged_output_dir(final) as staging:
            (staging / "newer.txt").write_text("newer")
    assert tree_digest(final) == {"new.txt": b"new"}


def test_unique_file_and_atomic_write_never_share_a_name(tmp_path: Path) -> None:
    names: list[Path] = []
    threads = [threading.Thread(target=lambda: names.append(unique_file(tmp_path, "demo_1", ".json")))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 16 and (tmp_path / "demo_1.json") in names and (tmp_path / "demo_1-15.json") in names
    atomic_write_text(names[0], "content")
    assert names[0].read_text() == "content" and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_merge_lora_refuses_outputs_that_would_destroy_inputs(tmp_path: Path, base_dir: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "lora_run.json").write_text(json.dumps({"base_model": str(base_dir)}))
    main = _script("merge_lora")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.bin").write_bytes(b"k")
    afile = tmp_path / "a.bin"
    afile.write_bytes(b"a")
    for out, needle in [(base_dir, "is the input"), (run, "is the input"), (run / "merged", "inside the input"),
                        (base_dir / "x", "inside the input"), (afile, "is a file"), (full, "not empty")]:
        _expect_refusal(main, ["--run_dir", str(run), "--output_dir", str(out)], [base_dir, run, full, afile], capsys,
                        needle)


def test_convert_to_hf_refuses_its_source(tmp_path: Path, base_dir: Path, capsys) -> None:
    main = _script("convert_to_hf")
    for out, needle in [(base_dir, "is the input"), (base_dir / "hf", "inside the input"), (tmp_path, "contains")]:
        _expect_refusal(main, [str(base_dir), str(out), "--allow-v1"], [base_dir], capsys, needle)


def test_demo_batch_out_refused_before_any_work(tmp_path: Path, capsys) -> None:
    import demo

    batch = tmp_path / "b.jsonl"
    batch.write_text(json.dumps({"id": 1, "conversations": [{"from": "human", "value": "hi"}]}) + "\n")
    afile = tmp_path / "results.json"
    afile.write_text("[\"earlier results\"]")
    for out, needle in [(afile, "is a file"), (batch, "is the input")]:
        _expect_refusal(demo.main, ["--batch", str(batch), "--out", str(out), "--model", str(tmp_path / "none")],
                        [afile, batch], capsys, needle)


def test_demo_batch_streams_answers_and_never_reuses_a_name(tmp_path: Path) -> None:
    from internvl.demo.batch import read_batch_file, run_batch, stream_path, write_results

    batch = tmp_path / "b.jsonl"
    batch.write_text("".join(json.dumps({"id": i, "conversations": [{"from": "human", "value": f"q{i}"}]}) + "\n"
                             for i in range(5)))
    items = read_batch_file(batch)

    class Failing:
        """Answers two batches of two, then dies (a crash late in a long run)."""

        def iter_generate(self, requests):
            yield [(0, "a0"), (1, "a1")]
            yield [(2, "a2"), (3, "a3")]
            raise RuntimeError("CUDA error: device lost")

    stream = stream_path(tmp_path / "out", "240101120000", 0)
    with pytest.raises(RuntimeError):
        run_batch(Failing(), items, stream=stream)
    kept = [json.loads(line)["pred_answer"] for line in stream.read_text().splitlines()]
    assert kept == ["a0", "a1", "a2", "a3"]  # finished answers survive the crash
    first = write_results([{"index": 0, "pred_answer": "x"}], tmp_path / "out", "240101120000")
    second = write_results([{"index": 0, "pred_answer": "y"}], tmp_path / "out", "240101120000")
    assert first.name == "demo_240101120000.json" and second.name == "demo_240101120000-1.json"
    assert json.loads(first.read_text()) == [{"pred_answer": "x"}]
    assert stream_path(tmp_path / "out", "240101120000", 0) != stream


def test_train_output_dir_that_is_a_file_or_the_model(tmp_path: Path, base_dir: Path, capsys) -> None:
    from internvl.train.cli import main

    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    afile = tmp_path / "out.txt"
    afile.write_text("not a directory")
    common = ["--meta_path", str(meta), "--max_steps", "1"]
    _expect_refusal(main, ["--preset", "tiny", "--tokenizer_path", str(base_dir), "--output_dir", str(afile),
                           *common], [afile, base_dir], capsys, "is a file")
    _expect_refusal(main, ["--model_name_or_path", str(base_dir), "--output_dir", str(base_dir), *common],
                    [base_dir], capsys, "is the input")


@pytest.fixture
def eval_setup(tmp_path, tiny_model, tiny_tokenizer, write_eval_benchmark):
    import numpy as np

    rows = [{"id": f"s{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nIs this normal?"}, {"from": "gpt", "value": "yes"}]} for i in range(3)]
    return write_eval_benchmark(tmp_path, tiny_model, tiny_tokenizer, rows, name="tiny_vqa", task="vqa",
                                pixels=lambda i: np.full((24, 32, 3), 40 * i, dtype=np.uint8))


def _run_args(model_dir, data, yml, out, *extra):
    return ["run", "--model", str(model_dir), "--benchmark", "tiny_vqa", "--benchmark-file", str(yml),
            "--data-dir", str(data), "--out", str(out), "--dtype", "float32", "--max-new-tokens", "3",
            "--batch-size", "3", *extra]


def test_eval_resume_refuses_other_settings_unless_overwrite(eval_setup, tmp_path, capsys) -> None:
    from medrega_eval.cli import main

    model_dir, data, yml, out = eval_setup
    assert main(_run_args(model_dir, data, yml, out)) == 0
    preds = out / "tiny_vqa" / "predictions"
    assert json.loads((out / "tiny_vqa" / "run_settings.json").read_text())["generation"]["max_new_tokens"] == 3
    assert main(_run_args(model_dir, data, yml, out)) == 0  # same settings: a plain resume
    capsys.readouterr()
    other_model = tmp_path / "model2"
    other_model.mkdir()
    for name in os.listdir(model_dir):
        (other_model / name).write_bytes((model_dir / name).read_bytes())
    for argv, needle in [(_run_args(model_dir, data, yml, out, "--max-new-tokens", "5"), "max_new_tokens"),
                         (_run_args(other_model, data, yml, out), "model: recorded"),
                         (_run_args(model_dir, data, yml, out, "--dtype", "bfloat16"), "dtype")]:
        _expect_refusal(main, argv, [preds], capsys, needle)
    (out / "tiny_vqa" / "run_settings.json").write_text("[1, 2]")  # valid JSON, not a settings object
    _expect_refusal(main, _run_args(model_dir, data, yml, out), [preds], capsys, "unreadable: recorded True")
    (out / "tiny_vqa" / "run_settings.json").unlink()  # predictions of unknown provenance are not merged either
    _expect_refusal(main, _run_args(model_dir, data, yml, out), [preds], capsys, "no run_settings.json")
    before = tree_digest(preds)
    assert main(_run_args(model_dir, data, yml, out, "--max-new-tokens", "5", "--overwrite")) == 0
    assert tree_digest(out / "tiny_vqa" / "replaced-1" / "predictions") == before  # old answers kept, not merged
    summary = json.loads((out / "tiny_vqa" / "summary.json").read_text())
    assert summary["protocol"]["generation"]["max_new_tokens"] == 5 and summary["num_samples"] == 3


def test_eval_out_that_is_a_file_or_the_predictions(tmp_path, capsys) -> None:
    from medrega_eval.cli import main

    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"id": 1, "prediction": "yes", "reference": "yes"}) + "\n")
    for out, needle in [(pred, "is the input"), (pred / "x", "inside the input")]:
        _expect_refusal(main, ["score", "--task", "vqa", "--pred", str(pred), "--out", str(out)], [pred], capsys, needle)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    inside = run_dir / "samples.jsonl"
    inside.write_text(pred.read_text())
    _expect_refusal(main, ["score", "--task", "vqa", "--pred", str(inside), "--out", str(run_dir)], [inside], capsys,
                    "would overwrite the prediction file")


def test_eval_rescoring_a_run_folder_keeps_its_predictions(tmp_path) -> None:
    from medrega_eval.cli import main

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    pred = run_dir / "predictions.jsonl"
    pred.write_text(json.dumps({"id": 1, "prediction": "yes", "reference": "yes"}) + "\n")
    before = pred.read_bytes()
    assert main(["score", "--task", "vqa", "--pred", str(pred), "--out", str(run_dir)]) == 0
    assert pred.read_bytes() == before and (run_dir / "summary.json").is_file()
