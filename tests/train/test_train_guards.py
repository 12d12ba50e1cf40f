"""Divergence guard: a non-finite loss or gradient stops the run naming the optimizer step and the batch's records (or
skips the step, counted, up to a limit), is never logged as 0.0, and no non-finite model is saved.

The non-finite steps are made on purpose: a forward hook on the embedding returns NaN on chosen micro-batches."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from internvl.testing.square_task import write_square_dataset
from internvl.train import checkpoint as ckpt
from internvl.train.arguments import parse_args
from internvl.train.guards import NonFiniteError, StepGuard, assert_finite_model
from internvl.train.manifest import verify_manifest
from internvl.train.trainer import MedRegTrainer

from .test_train_cli_resume import ROOT, cli_args, env
from .test_train_trainer_core import args, make_samples, tiny_llama


class IndexedDataset(torch.utils.data.Dataset):
    """Samples that carry their index (as the real dataset does) and a `describe` for error messages."""

    def __init__(self, n: int) -> None:
        self.samples = make_samples(n)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return {**self.samples[i], "sample_index": i}

    def describe(self, i: int) -> str:
        return f"records.jsonl:{i + 1}"


def poisoned_model(bad_calls: set[int] | None = None, from_call: int | None = None):
    """tiny Llama whose embedding output is NaN on the given (1-based) forward calls."""
    model = tiny_llama()
    calls = {"n": 0}

    def hook(_module, _inputs, output):
        calls["n"] += 1
        if (bad_calls and calls["n"] in bad_calls) or (from_call is not None and calls["n"] >= from_call):
            return output * float("nan")
        return output

    model.model.embed_tokens.register_forward_hook(hook)
    return model


class Snapshots(TrainerCallback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.weights.append(model.lm_head.weight.detach().clone())


@pytest.fixture
def make_trainer(tmp_path, pad_text_batch):
    """A MedRegTrainer of ``model`` over 16 indexed samples, writing to ``tmp_path``; ``kw`` overrides arguments."""

    def make(model, **kw) -> MedRegTrainer:
        base = dict(learning_rate=1e-2, max_grad_norm=1.0, max_steps=4, logging_steps=1)
        base.update(kw)
        return MedRegTrainer(model=model, args=args(tmp_path, **base), train_dataset=IndexedDataset(16),
                             data_collator=pad_text_batch)

    return make


def test_stop_names_step_and_records_and_saves_nothing_nonfinite(tmp_path, make_trainer):
    trainer = make_trainer(poisoned_model({3}), save_strategy="steps", save_steps=1,
                           per_device_train_batch_size=2, gradient_accumulation_steps=2)
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    message = str(info.value)
    # micro-batches 3 and 4 (step 2, two micro-batches of 2, sequential sampling): samples 4..7
    assert "optimizer step 2" in message and "non-finite loss" in message
    assert "records.jsonl:5, records.jsonl:6, records.jsonl:7, records.jsonl:8" in message
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / ".staging" / "checkpoint-2").exists()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # stopped before the update


def test_skip_drops_the_update_counts_it_and_logs_nan_not_zero(make_trainer):
    snaps = Snapshots()
    trainer = make_trainer(poisoned_model({2}), on_nonfinite="skip", max_nonfinite_steps=3)
    trainer.add_callback(snaps)
    trainer.train()
    assert trainer.guard.skipped_steps == [2]
    assert torch.equal(snaps.weights[0], snaps.weights[1])  # step 2 did not move the weights
    assert not torch.equal(snaps.weights[1], snaps.weights[2])  # step 3 trained again
    logs = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert math.isnan(logs[2]["loss"]) and math.isnan(logs[2]["grad_norm"])  # never 0.0
    assert logs[2]["nonfinite_steps_skipped"] == 1
    assert all(math.isfinite(logs[s]["loss"]) and logs[s]["loss"] > 0 for s in (1, 3, 4))
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_skip_window_loss_leaves_skipped_steps_out():
    guard = StepGuard(policy="skip")
    guard.skipped_steps = [3]
    assert guard.window_loss(6.0, step=4, previous_log_step=0) == pytest.approx(8.0)  # 6*4 summed over 3 steps
    assert math.isnan(guard.window_loss(0.0, step=3, previous_log_step=2))
    assert guard.window_loss(5.0, step=2, previous_log_step=0) == 5.0


def test_skip_limit_stops_the_run(make_trainer):
    trainer = make_trainer(poisoned_model(from_call=2), on_nonfinite="skip", max_nonfinite_steps=2,
                           max_steps=6)
    with pytest.raises(NonFiniteError, match=r"optimizer step 4: .*after 2 skipped steps"):
        trainer.train()
    assert trainer.guard.skipped_steps == [2, 3]


def test_a_nonfinite_model_is_never_saved(tmp_path, make_trainer):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="model.layers.1.mlp.up_proj.weight"):
        assert_finite_model(model, "checkpoint-3")
    trainer = make_trainer(model)
    trainer.state.global_step = 3
    with pytest.raises(NonFiniteError, match="refusing to save checkpoint-3"):
        trainer._save_checkpoint(trainer.model, None)
    assert ckpt.list_checkpoints(tmp_path) == []


def test_guard_options_are_checked_where_the_flags_are_parsed():
    flags = ["--model_name_or_path", "c", "--meta_path", "m.json", "--output_dir", "o", "--use_cpu", "True"]
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        parse_args([*flags, "--on_nonfinite", "ignore"])
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        parse_args([*flags, "--on_nonfinite", "skip", "--max_nonfinite_steps", "-1"])


def test_cli_learning_rate_1e6_stops_with_step_and_record_ids(tmp_path, tiny_tokenizer_dir):
    """The reported failure: --learning_rate 1e6 logged loss 0.0, grad_norm nan, exit 0 and saved a NaN model."""
    meta = write_square_dataset(tmp_path / "data", n=8, seed=0)
    out = tmp_path / "run"
    argv = cli_args(out, tiny_tokenizer_dir, meta, 6, "--report_to", "none")
    argv[argv.index("--learning_rate") + 1] = "1e6"
    argv[argv.index("--save_steps") + 1] = "3"
    result = subprocess.run([sys.executable, "-m", "internvl.train", *argv], capture_output=True, text=True, env=env(),
                            cwd=ROOT, timeout=300)
    assert result.returncode == 3, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("medrega-train: error:")]
    assert len(error) == 1 and "Traceback" not in result.stderr
    assert re.search(r"optimizer step \d+: non-finite", error[0])
    assert f"{meta.parent / 'squares.jsonl'}:" in error[0] and "(id 'squares-" in error[0]
    assert not (out / "model.safetensors").exists()
    for _, path in ckpt.list_checkpoints(out):  # saved before the divergence, if any: finite
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())
    assert "'loss': '0'" not in result.stdout and "'loss': 0.0" not in result.stdout


def test_checkpoints_of_a_training_run_carry_a_verified_manifest(tmp_path, make_trainer):
    trainer = make_trainer(tiny_llama(), save_strategy="steps", save_steps=2)
    trainer.train()
    for _, path in ckpt.list_checkpoints(tmp_path):
        files = json.loads((path / "manifest.json").read_text())["files"]
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                "trainer_state.json"} <= set(files)
        assert "training_args.bin" not in files and "training_args.json" in files
        assert not list(path.glob("manifest.rank*.json"))
        assert verify_manifest(path) == []


def test_fp16_leaves_an_overflowing_gradient_to_the_loss_scaler():
    """With a loss scaler an inf gradient norm is a skipped step, not divergence; a NaN loss still stops the run."""
    guard = StepGuard(check_grad_norm=False)
    assert guard.check_step(1, torch.tensor(float("inf")), torch.tensor(2.5))
    with pytest.raises(NonFiniteError, match="optimizer step 2: non-finite loss;"):
        guard.check_step(2, torch.tensor(float("inf")), torch.tensor(float("nan")))


def test_fsdp2_grad_norm_dtensor_is_read_like_a_tensor(tmp_path):
    """FSDP2's gradient clipping returns the norm as a replicated DTensor; the guard reads it (finite or not)."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        guard = StepGuard(policy="skip")
        finite = distribute_tensor(torch.tensor(3.0), mesh, [Replicate()])
        assert guard.check_step(1, finite, torch.tensor(1.0)) is True
        assert guard.check_step(2, distribute_tensor(torch.tensor(math.nan), mesh, [Replicate()]),
                                torch.tensor(1.0)) is False
    finally:
        dist.destroy_process_group()
