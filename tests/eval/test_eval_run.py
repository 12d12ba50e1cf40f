"""`medrega-eval run` on the tiny model: generation + scoring, resume without regenerating, crash repair, and
two torchrun ranks on CPU (gloo)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from internvl.inference import Generator
from medrega_eval import cli

N = 5


@pytest.fixture
def setup(tmp_path, tiny_model, tiny_tokenizer, write_eval_benchmark):
    rng = np.random.default_rng(0)
    rows = [{"id": f"s{i}", "image": f"{i}.png", "width": 32, "height": 24, "conversations": [
        {"from": "human", "value": "<image>\nPlease locate the liver in this CT scan."},
        {"from": "gpt", "value": f"<ref>liver</ref><box>[[{10 * i}, 10, {10 * i + 300}, 400]]</box>"}]}
        for i in range(N)]
    return write_eval_benchmark(tmp_path, tiny_model, tiny_tokenizer, rows, name="tiny_t2r", task="text2region",
                                pixels=lambda i: rng.integers(0, 255, (24, 32, 3), dtype=np.uint8),
                                extra_yaml="    size: 5\n    download: nothing to download\n")


def _args(model_dir, data, yml, out, *extra):
    return ["run", "--model", str(model_dir), "--benchmark", "tiny_t2r", "--benchmark-file", str(yml),
            "--data-dir", str(data), "--out", str(out), "--dtype", "float32", "--max-new-tokens", "4",
            "--batch-size", "2", *extra]


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_run_generates_scores_and_resumes(setup, monkeypatch):
    model_dir, data, yml, out = setup
    calls = []
    real = Generator.generate_batch

    def counting(self, requests):
        calls.append(len(requests))
        return real(self, requests)

    monkeypatch.setattr(Generator, "generate_batch", counting)
    assert cli.main(_args(model_dir, data, yml, out)) == 0
    assert sum(calls) == N and max(calls) == 2
    bdir = out / "tiny_t2r"
    summary = json.loads((bdir / "summary.json").read_text())
    assert summary["counts"]["benchmark_samples"] == N and summary["counts"]["missing_predictions"] == 0
    assert summary["protocol"]["generation"]["max_new_tokens"] == 4 and summary["protocol"]["world_size"] == 1
    assert summary["protocol"]["model"] == str(model_dir) and "iou" in summary and "map50" in summary
    rank0 = bdir / "predictions" / "rank0.jsonl"
    assert len(_lines(rank0)) == N and len(_lines(bdir / "predictions.jsonl")) == N

    # a second run finds every id finished: nothing is generated again, nothing is appended
    calls.clear()
    assert cli.main(_args(model_dir, data, yml, out)) == 0
    assert calls == [] and len(_lines(rank0)) == N

    # a crash mid-write leaves half a line: it is cut off and only that sample is generated again
    text = rank0.read_text(encoding="utf-8")
    rank0.write_text(text + '{"id": "s9", "predic', encoding="utf-8")
    lines = _lines(rank0)
    rank0.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:15], encoding="utf-8")  # s_last half-written
    assert cli.main(_args(model_dir, data, yml, out)) == 0
    assert sum(calls) == 1 and len(_lines(rank0)) == N
    assert all(json.loads(line)["id"] for line in _lines(rank0))


def test_run_missing_data_fails_before_loading(setup, tmp_path, capsys):
    model_dir, data, yml, out = setup
    args = _args(model_dir, tmp_path / "nowhere", yml, out)
    assert cli.main(args) == 2  # one line, no traceback
    assert "nothing to download" in capsys.readouterr().err


def test_run_unknown_benchmark_exit_2(setup):
    model_dir, data, yml, out = setup
    args = _args(model_dir, data, yml, out)
    args[args.index("tiny_t2r")] = "nope"
    assert cli.main(args) == 2


@pytest.mark.slow
def test_torchrun_two_ranks_shard_and_merge(setup):
    model_dir, data, yml, out = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "medrega_eval", *_args(model_dir, data, yml, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pdir = out / "tiny_t2r" / "predictions"
    r0, r1 = _lines(pdir / "rank0.jsonl"), _lines(pdir / "rank1.jsonl")
    assert len(r0) == 3 and len(r1) == 2  # samples 0,2,4 on rank 0; 1,3 on rank 1
    ids = sorted(json.loads(line)["id"] for line in r0 + r1)
    assert ids == [f"s{i}" for i in range(N)]
    summary = json.loads((out / "tiny_t2r" / "summary.json").read_text())
    assert summary["protocol"]["world_size"] == 2 and summary["num_samples"] == N


def test_a_failing_batch_is_retried_one_request_at_a_time(tmp_path):
    from types import SimpleNamespace

    from medrega_eval.run import _safe_batches

    class Gen:
        batch_size = 2

        def generate_batch(self, reqs):
            if any(r.id == "bad" for r in reqs):
                raise ValueError("broken image")
            return [r.id.upper() for r in reqs]

    reqs = [SimpleNamespace(id=i, images=[], prompt="p") for i in ("a", "bad", "c")]
    got = [pair for batch in _safe_batches(Gen(), reqs, tmp_path / "err.jsonl", 0) for pair in batch]
    assert got == [(0, "A"), (2, "C")]
    assert json.loads((tmp_path / "err.jsonl").read_text()) == {"id": "bad", "rank": 0, "error": "broken image"}
