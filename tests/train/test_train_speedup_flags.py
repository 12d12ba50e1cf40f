"""The trainer's fast-path flags: parsed into `TrainSpeedups`, applied when training starts (a no-op on the CPU), and
the trainer's loss with the fast paths on (compiled layers with aot_eager, fused projections, fused LM-head loss)
equals the plain full-logits loss and gradients on the tiny preset."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from internvl.data.collate import pad_collate
from internvl.ops.train_speedups import TrainSpeedups, apply_train_speedups
from internvl.train.arguments import (
    MedRegTrainingArguments,
    parse_args,
)
from internvl.train.cli import speedups_from_args
from internvl.train.trainer import MedRegTrainer, RunCallback

from .loss_grads import assert_same_loss_and_grads, loss_and_grads, tiny_square_setup


def test_flags_map_to_speedups(tmp_path):
    base = ["--preset", "tiny", "--tokenizer_path", "tok", "--meta_path", "m.json", "--output_dir", str(tmp_path)]
    model_args, _, _ = parse_args(base)
    assert speedups_from_args(model_args) == TrainSpeedups()  # the defaults are the trainer's defaults
    model_args, _, _ = parse_args(base + ["--compile_layers", "False", "--fuse_projections", "False",
                                          "--grad_checkpoint_skip_llm_layers", "3"])
    opts = speedups_from_args(model_args)
    assert (opts.compile_layers, opts.fuse_projections, opts.ckpt_skip_llm_layers) == (False, False, 3)
    with pytest.raises(ValueError, match="--fast_kernels"):  # the liger swaps moved to the lab (lab/fast_kernels.py)
        parse_args(base + ["--fast_kernels", "False"])
    model_args, _, _ = parse_args(base + ["--grad_checkpoint", "False", "--grad_checkpoint_skip_llm_layers", "3"])
    assert speedups_from_args(model_args).ckpt_skip_llm_layers == 0


def test_trainer_loss_with_fast_paths_equals_plain(tmp_path, tiny_tokenizer_dir):
    built, items, args = tiny_square_setup(tmp_path, tiny_tokenizer_dir, seed=2, grad_checkpoint=True)
    batch = pad_collate(items)
    results = []
    for fast in (False, True):
        model = copy.deepcopy(built.model).train()
        opts = TrainSpeedups(backend="aot_eager")
        trainer = MedRegTrainer(model=model, args=args, fused_lm_loss=fast, speedups=opts if fast else None)
        if fast:
            report = apply_train_speedups(model, opts, allow_cpu=True)
            assert report["compiled"] and report["fused"] == {"qkv": 2, "gate_up": 2}
        results.append(loss_and_grads(trainer, model, batch, 23.0))
    assert_same_loss_and_grads(*results)


def test_speedup_callback_is_a_no_op_on_the_cpu(tmp_path, tiny_model):
    args = MedRegTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = MedRegTrainer(model=tiny_model, args=args, speedups=TrainSpeedups())
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, RunCallback))
    callback.on_train_begin(args, trainer.state, trainer.control, model=tiny_model)
    assert callback.report["compiled"] == {} and "not on CUDA" in callback.report["skipped"][0]
    assert not any("forward" in m.__dict__ for m in tiny_model.modules())


def test_speedup_callback_hands_back_a_plain_model(tmp_path, tiny_model):
    """on_train_end undoes what on_train_begin applied (here forced onto the CPU with aot_eager)."""
    callback = RunCallback(SimpleNamespace(speedups=TrainSpeedups(backend="aot_eager"), _restore_engine=lambda: None))
    callback.report = apply_train_speedups(tiny_model, callback.trainer.speedups, allow_cpu=True)
    assert any("forward" in m.__dict__ for m in tiny_model.modules())
    callback.on_train_end(None, None, None, model=tiny_model)
    assert callback.report is None
    assert not any("forward" in m.__dict__ for m in tiny_model.modules())
