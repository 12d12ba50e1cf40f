"""`internvl.train.fsdp.place_frozen_towers`: under FSDP the frozen ViT and projector are stored in bf16 (under
--bf16), kept out of FSDP through this run's plugin arguments (accelerate's `ignored_modules`) and their layer class
leaves the wrap list; nothing changes without FSDP, with `--fsdp_frozen_towers sharded`, or for a trainable tower.
The sharding itself (5 FSDP2 units instead of 7, the towers' tensors plain, same losses) is checked by
`lab/tests/test_recipe.py`, where accelerate really applies FSDP2 on the CPU."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from accelerate.utils import FullyShardedDataParallelPlugin

from internvl.model import InternVLChatModel, load_preset
from internvl.train.arguments import MedRegTrainingArguments, parse_args
from internvl.train.fsdp import FROZEN_TOWERS, place_frozen_towers

ROOT = Path(__file__).resolve().parents[2]
FSDP2_CONFIG = ROOT / "src" / "shell" / "fsdp2_config.json"
SHIPPED_WRAP = "InternVisionEncoderLayer,LlamaDecoderLayer"


@pytest.fixture(scope="module")
def base_model() -> InternVLChatModel:
    torch.manual_seed(0)
    return InternVLChatModel(load_preset("tiny"))


def _model(base: InternVLChatModel, trainable: tuple[str, ...] = ()) -> InternVLChatModel:
    """A copy of the tiny model with the towers frozen except `trainable`, fp32 everywhere."""
    model = copy.deepcopy(base)
    for name in FROZEN_TOWERS:
        getattr(model, name).requires_grad_(name in trainable)
    return model


def _args(tmp_path: Path, fsdp: bool = True, **kw) -> MedRegTrainingArguments:
    kw.setdefault("bf16", True)
    return MedRegTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                   **({"fsdp": "full_shard", "fsdp_config": str(FSDP2_CONFIG)} if fsdp else {}), **kw)


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


def test_default_replicates_frozen_towers_in_bf16_outside_fsdp(tmp_path, base_model, monkeypatch, caplog):
    monkeypatch.delenv("FSDP_IGNORED_MODULES", raising=False)
    model, args = _model(base_model), _args(tmp_path)
    assert args.fsdp_frozen_towers == "replicated"
    with caplog.at_level(logging.INFO, logger="internvl.train"):
        placed = place_frozen_towers(model, args)
    assert placed.replicated == ["vision_model", "mlp1"] and placed.unwrapped == ["InternVisionEncoderLayer"]
    towers = [model.vision_model, model.mlp1]
    assert placed.cast_to_bf16 == sum(1 for t in towers for _ in t.parameters()) == 36
    assert _dtypes(model.vision_model) == _dtypes(model.mlp1) == {torch.bfloat16}
    assert _dtypes(model.language_model) == {torch.float32}  # FSDP2's fp32 master weights stay as they were
    assert placed.bytes_per_gpu == sum(p.numel() * 2 for t in towers for p in t.parameters())
    assert args.fsdp_plugin_args["ignored_modules"] == "vision_model|mlp1"
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == "LlamaDecoderLayer"
    assert args.fsdp_config["transformer_layer_cls_to_wrap"] == SHIPPED_WRAP.split(",")  # run_config: as given
    assert "FSDP_IGNORED_MODULES" not in os.environ  # this run's arguments only, not the process
    # what accelerate builds from them at Trainer creation: the towers are ignored, the ViT layer is not wrapped
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    reg = re.compile(plugin.ignored_modules)
    assert [n for n, _ in model.named_modules() if reg.fullmatch(n)] == ["vision_model", "mlp1"]
    (line,) = [r.getMessage() for r in caplog.records if "FSDP" in r.getMessage()]
    assert "vision_model, mlp1 replicated" in line and "InternVisionEncoderLayer off the wrap list" in line


def test_fp32_run_replicates_without_casting(tmp_path, base_model):
    model, args = _model(base_model), _args(tmp_path, bf16=False)
    placed = place_frozen_towers(model, args)
    assert placed.replicated == ["vision_model", "mlp1"] and placed.cast_to_bf16 == 0
    assert _dtypes(model.vision_model) == {torch.float32}
    assert args.fsdp_plugin_args["ignored_modules"] == "vision_model|mlp1"


@pytest.mark.parametrize("case", ["no_fsdp", "sharded", "both_trainable"])
def test_untouched_without_fsdp_with_sharded_or_trainable_towers(tmp_path, base_model, case):
    trainable = FROZEN_TOWERS if case == "both_trainable" else ()
    model = _model(base_model, trainable)
    args = _args(tmp_path, fsdp=case != "no_fsdp", **({"fsdp_frozen_towers": "sharded"} if case == "sharded" else {}))
    before = copy.deepcopy(args.fsdp_plugin_args)
    placed = place_frozen_towers(model, args)
    assert placed.replicated == [] and placed.cast_to_bf16 == 0 and placed.reason
    assert args.fsdp_plugin_args == before
    assert _dtypes(model) == {torch.float32}
    if before is not None:
        assert "ignored_modules" not in before and before["transformer_cls_names_to_wrap"] == SHIPPED_WRAP


def test_a_trainable_vit_stays_sharded_and_wrapped(tmp_path, base_model):
    """Only the frozen projector is replicated; the trainable ViT keeps its dtype and its layers stay FSDP units."""
    model, args = _model(base_model, ("vision_model",)), _args(tmp_path)
    placed = place_frozen_towers(model, args)
    assert placed.replicated == ["mlp1"] and placed.unwrapped == [] and "vision_model" in placed.reason
    assert _dtypes(model.vision_model) == {torch.float32} and _dtypes(model.mlp1) == {torch.bfloat16}
    assert args.fsdp_plugin_args["ignored_modules"] == "mlp1"
    assert args.fsdp_plugin_args["transformer_cls_names_to_wrap"] == SHIPPED_WRAP


def test_two_runs_in_one_process_do_not_leak(tmp_path, base_model, monkeypatch):
    """The lab bench trains several cases in one process: a replicated run leaves nothing for a sharded one."""
    monkeypatch.delenv("FSDP_IGNORED_MODULES", raising=False)
    place_frozen_towers(_model(base_model), _args(tmp_path))
    second = _args(tmp_path, fsdp_frozen_towers="sharded")
    place_frozen_towers(_model(base_model), second)
    plugin = FullyShardedDataParallelPlugin(**second.fsdp_plugin_args)
    assert plugin.ignored_modules is None
    assert plugin.transformer_cls_names_to_wrap == SHIPPED_WRAP.split(",")


def test_a_users_ignored_modules_are_kept(tmp_path, base_model, monkeypatch):
    monkeypatch.setenv("FSDP_IGNORED_MODULES", "language_model.lm_head")
    model, args = _model(base_model), _args(tmp_path)
    place_frozen_towers(model, args)
    reg = re.compile(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args).ignored_modules)
    assert {n for n, _ in model.named_modules() if reg.fullmatch(n)} == {"vision_model", "mlp1",
                                                                          "language_model.lm_head"}


def test_the_flag_parses_and_rejects_unknown_values(tmp_path, capsys):
    base = ["--preset", "tiny", "--tokenizer_path", str(tmp_path), "--meta_path", str(tmp_path / "m.json"),
            "--output_dir", str(tmp_path / "out"), "--use_cpu", "True"]
    assert parse_args(base)[2].fsdp_frozen_towers == "replicated"
    assert parse_args(base + ["--fsdp_frozen_towers", "sharded"])[2].fsdp_frozen_towers == "sharded"
    with pytest.raises(SystemExit) as exc:
        parse_args(base + ["--fsdp_frozen_towers", "offloaded"])
    assert exc.value.code == 2 and "fsdp_frozen_towers" in capsys.readouterr().err


def test_medrega_train_places_the_towers_before_the_trainer(tmp_path, tiny_tokenizer_dir):
    """`medrega-train --fsdp ...` (one rank under torchrun: transformers wants a process group for FSDP) with the
    towers frozen logs the placement and records it in run_config.json (on the CPU accelerate then drops FSDP, so
    the run itself is the unsharded one; the sharding is the lab test's)."""
    from internvl.testing.square_task import write_square_dataset

    meta = write_square_dataset(tmp_path / "data", n=4, seed=0)
    out = tmp_path / "run"
    cmd = ["torchrun", "--standalone", "--nproc-per-node=1", "-m", "internvl.train", "--preset", "tiny",
           "--tokenizer_path", str(tiny_tokenizer_dir), "--meta_path", str(meta), "--output_dir", str(out),
           "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
           "--use_cpu", "True", "--disable_tqdm", "True", "--max_seq_length", "512", "--grad_checkpoint", "False",
           "--freeze_backbone", "True", "--freeze_mlp", "True", "--fsdp", "full_shard",
           "--fsdp_config", str(FSDP2_CONFIG)]
    env = {k: v for k, v in os.environ.items()
           if k != "FSDP_IGNORED_MODULES" and not k.startswith(("MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GLOO_SOCKET_IFNAME="lo")
    run = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    placed = json.loads((out / "run_config.json").read_text())["resolved"]["fsdp_frozen_towers"]
    assert placed["replicated"] == ["vision_model", "mlp1"] and placed["unwrapped"] == ["InternVisionEncoderLayer"]
    assert placed["cast_to_bf16"] == 0  # fp32 run: replicated in fp32
    assert "FSDP: frozen vision_model, mlp1 replicated on every rank" in run.stdout + run.stderr
