"""src/shell: DeepSpeed configs validate against DeepSpeed's own config models; the recipe scripts produce the flags
of the MedRegA recipes (checked by `medrega-train`'s own parser) under plain torchrun and under slurm (fake srun and
scontrol on PATH, two nodes), on GPUs (bf16 + ZeRO-3) and on a CPU-only machine (float32, no DeepSpeed)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.train.arguments import parse_args

ROOT = Path(__file__).resolve().parents[2]
SHELL = ROOT / "src" / "shell"


@pytest.mark.parametrize("name,stage,offload", [("zero_stage1_config.json", 1, False),
                                                ("zero_stage2_config.json", 2, False),
                                                ("zero_stage3_config.json", 3, False),
                                                ("zero_stage3_tuned_config.json", 3, False),
                                                ("zero_stage3_offload_config.json", 3, True)])
def test_deepspeed_configs_validate(name, stage, offload):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    config = json.loads((SHELL / name).read_text())
    zero = DeepSpeedZeroConfig(**{k: (5e8 if v == "auto" else v) for k, v in config["zero_optimization"].items()})
    assert int(zero.stage) == stage
    assert (zero.offload_optimizer is not None) == offload and (zero.offload_param is not None) == offload
    assert config["bf16"]["enabled"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    if stage == 3:
        assert zero.gather_16bit_weights_on_model_save  # final save_pretrained gets full weights


def _fake_bin(tmp_path: Path) -> Path:
    """`torchrun`/`srun`/`scontrol` stand-ins that record their argv (one JSON list per line)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    for tool in ("torchrun", "srun"):
        script = bin_dir / tool
        script.write_text("#!/usr/bin/env python3\nimport json, sys\n"
                          f"open({str(log)!r}, 'a').write(json.dumps([{tool!r}] + sys.argv[1:]) + '\\n')\n")
        script.chmod(script.stat().st_mode | stat.S_IEXEC)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\necho gpu-node-07\necho gpu-node-08\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def _run_recipe(tmp_path: Path, recipe: str, extra_env: dict[str, str]) -> list[list[str]]:
    bin_dir = _fake_bin(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MODEL="preset:tiny", TOKENIZER=str(tmp_path / "tok"),
               META=str(tmp_path / "meta.json"), OUTPUT=str(tmp_path / "out"), GPUS_PER_NODE="2", BATCH_SIZE="16",
               PER_DEVICE_BATCH_SIZE="4", MEDREGA_DEVICE="cuda")
    env.update(extra_env)
    recipe, *mode = recipe.split(":")  # "medrega_stage2.sh:full" -> MODE=full
    if mode:
        env["MODE"] = mode[0]
    result = subprocess.run(["bash", str(SHELL / recipe), "--max_steps", "3"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    (tmp_path / "stdout.txt").write_text(result.stdout)
    return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def _parse(call: list[str]):
    """Parse the `python -m internvl.train` part with medrega-train's parser. `--bf16 True` and `--deepspeed` need a
    GPU to validate, so they are checked here and left out of the parse."""
    argv = call[call.index("internvl.train") + 1:]
    flags = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i] in ("--bf16", "--deepspeed")}
    assert flags["--bf16"] == "True" and argv.count("--deepspeed") == 1
    deepspeed = Path(flags["--deepspeed"])
    assert deepspeed.is_file()
    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--bf16", "--deepspeed"):
            skip = True
            continue
        rest.append(a)
    model_args, data_args, training_args = parse_args(rest + ["--use_cpu", "True"])
    return model_args, data_args, training_args, deepspeed


@pytest.mark.parametrize("recipe,expect,train_expect", [
    ("medrega_stage1_projector.sh", dict(freeze_llm=True, freeze_backbone=True, freeze_mlp=False, use_llm_lora=0),
     dict(learning_rate=2e-4, save_steps=1000)),
    ("medrega_stage2.sh:full", dict(freeze_llm=False, freeze_backbone=True, freeze_mlp=True, use_llm_lora=0),
     dict(learning_rate=1e-5, save_steps=1300)),
    ("medrega_stage2.sh", dict(freeze_llm=True, freeze_backbone=True, freeze_mlp=True, use_llm_lora=16),
     dict(learning_rate=1e-5, save_steps=1300)),  # MODE=lora is the default
])
def test_recipes_under_torchrun(tmp_path, recipe, expect, train_expect):
    calls = _run_recipe(tmp_path, recipe, {})
    assert len(calls) == 1 and calls[0][0] == "torchrun"
    assert "--nproc-per-node=2" in calls[0] and "--nnodes=1" in calls[0] and "--standalone" in calls[0]
    model_args, data_args, training_args, deepspeed = _parse(calls[0])
    for key, value in expect.items():
        assert getattr(model_args, key) == value, key
    for key, value in train_expect.items():
        assert getattr(training_args, key) == value, key
    assert model_args.preset == "tiny" and data_args.conv_style == "Hermes-2" and data_args.force_image_size == 448
    assert training_args.gradient_accumulation_steps == 2  # 16 / (4 per GPU x 2 GPUs)
    assert training_args.max_steps == 3  # extra flags are passed on and win
    assert data_args.max_seq_length == 2048 and data_args.group_by_length and model_args.grad_checkpoint
    assert deepspeed.name == "zero_stage3_tuned_config.json"  # the measured default (docs/performance.md)
    # the flags every recipe shares (src/shell/common.sh)
    assert model_args.tokenizer_path == str(tmp_path / "tok") and data_args.meta_path == str(tmp_path / "meta.json")
    assert training_args.output_dir == str(tmp_path / "out") and (tmp_path / "out").is_dir()
    assert (tmp_path / "logs").is_dir()  # where the #SBATCH --output lines write
    assert data_args.down_sample_ratio == 0.5 and not data_args.pad2square
    assert model_args.ps_version == "v1" and model_args.drop_path_rate == 0.0 and model_args.vision_select_layer == -1
    assert training_args.num_train_epochs == 1 and training_args.per_device_train_batch_size == 4
    assert training_args.weight_decay == 0.05 and training_args.warmup_ratio == 0.03
    assert training_args.lr_scheduler_type == "cosine" and training_args.save_strategy == "steps"
    assert training_args.save_total_limit == 2 and training_args.logging_steps == 1
    assert training_args.report_to == ["tensorboard"] and training_args.dataloader_num_workers == 4
    assert training_args.resume_from_checkpoint == "auto"


@pytest.mark.parametrize("recipe", ["medrega_stage1_projector.sh", "medrega_stage2.sh:full", "medrega_stage2.sh"])
def test_recipe_environment_overrides(tmp_path, recipe):
    ds_config = tmp_path / "ds.json"
    ds_config.write_text("{}")
    (call,) = _run_recipe(tmp_path, recipe, {"LR": "3e-3", "EPOCHS": "2", "SAVE_STEPS": "7", "LORA_RANK": "8",
                                             "DS_CONFIG": str(ds_config)})
    model_args, _, training_args, deepspeed = _parse(call)
    assert training_args.learning_rate == 3e-3 and training_args.num_train_epochs == 2
    assert training_args.save_steps == 7 and deepspeed == ds_config
    assert model_args.use_llm_lora == (8 if recipe == "medrega_stage2.sh" else 0)


def test_recipe_under_slurm_uses_first_node_for_rendezvous(tmp_path):
    calls = _run_recipe(tmp_path, "medrega_stage2.sh:full", {
        "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_CPUS_PER_TASK": "16"})
    (call,) = calls
    srun = call[:call.index("bash")]
    assert call[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert "--cpus-per-task=16" in srun  # srun does not inherit it since Slurm 22.05
    # each node's agent advertises its own slurm node name (evaluated on that node by bash -c)
    assert "--local-addr" in call[call.index("bash") + 2]
    torchrun = call[call.index("torchrun"):]
    assert "--nnodes=2" in torchrun and "--rdzv-backend=c10d" in torchrun and "--rdzv-id=4242" in torchrun
    assert "--rdzv-endpoint=gpu-node-07:34116" in torchrun
    _, _, training_args, _ = _parse(call)
    assert training_args.gradient_accumulation_steps == 1  # 16 / (4 x 2 GPUs x 2 nodes)


def test_recipe_rejects_a_batch_that_does_not_divide(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GPUS_PER_NODE="3", BATCH_SIZE="16",
               PER_DEVICE_BATCH_SIZE="4", OUTPUT=str(tmp_path / "o"))
    result = subprocess.run(["bash", str(SHELL / "medrega_stage2.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a multiple" in result.stderr


def test_recipe_on_a_cpu_only_machine_runs_float32_without_deepspeed(tmp_path):
    (call,) = _run_recipe(tmp_path, "medrega_stage2.sh", {"MEDREGA_DEVICE": "cpu", "GPUS_PER_NODE": "1",
                                                          "MODEL": str(tmp_path / "ckpt"), "BATCH_SIZE": "8"})
    argv = call[call.index("internvl.train") + 1:]
    assert "--deepspeed" not in argv
    model_args, data_args, training_args = parse_args(argv)  # parses as is: nothing needs a GPU
    assert not training_args.bf16 and training_args.use_cpu
    assert model_args.model_name_or_path == str(tmp_path / "ckpt")
    assert data_args.force_image_size is None  # a checkpoint keeps its own tile size unless IMAGE_SIZE is set
    assert "device cpu" in (tmp_path / "stdout.txt").read_text()


def test_no_slurm_inside_an_allocation_counts_the_nodes_torchrun_runs(tmp_path):
    (call,) = _run_recipe(tmp_path, "medrega_stage2.sh", {
        "SLURM_JOB_ID": "77", "SLURM_NNODES": "4", "SLURM_JOB_NODELIST": "n[1-4]", "MEDREGA_NO_SLURM": "1",
        "IMAGE_SIZE": "224"})
    assert call[0] == "torchrun" and "--nnodes=1" in call
    _, data_args, training_args, _ = _parse(call)
    assert training_args.gradient_accumulation_steps == 2  # 16 / (4 per GPU x 2 GPUs x 1 node), not 4 nodes
    assert "(1 node(s) x 2)" in (tmp_path / "stdout.txt").read_text()
    assert data_args.force_image_size == 224


def test_stage2_rejects_an_unknown_mode(tmp_path):
    env = dict(os.environ, MODE="int8", OUTPUT=str(tmp_path / "o"))
    result = subprocess.run(["bash", str(SHELL / "medrega_stage2.sh")], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "MODE=int8" in result.stderr


def test_loss_comparison_of_the_gpu_checks_fails_on_a_mismatch(tmp_path):
    """lab/scripts/gpu_multi_train_check.sh asserts through `lab.scripts.summarize_train_logs --max-diff`: exit 1 when a per-step
    loss differs by more than the limit or a step is missing, 0 when the curves agree."""
    def state(name: str, curve: list[float]) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"log_history": [{"step": i + 1, "loss": x} for i, x in enumerate(curve)]}))
        return path

    ref = state("ref", [2.0, 1.5, 1.2])
    script = [sys.executable, "-m", "lab.scripts.summarize_train_logs"]  # the lab runs from the repository root
    for curve, code in (([2.0, 1.5, 1.2001], 0), ([2.0, 1.5, 1.3], 1), ([2.0, 1.5], 1)):
        other = state("other", curve)
        result = subprocess.run(script + [str(ref), str(other), "--reference", str(ref), "--max-diff", "0.01"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert result.returncode == code, (curve, result.stdout, result.stderr)


def test_tuned_zero3_config_is_the_shipped_one_with_layer_leaf_modules():
    """zero_stage3_tuned_config.json differs from the shipped ZeRO-3 config only in its bucket sizes and in naming
    the ViT and LLM layer classes as leaf modules (one gather per layer; lab/bench/recipe.py zero3_tuned)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    shipped = json.loads((SHELL / "zero_stage3_config.json").read_text())
    tuned = json.loads((SHELL / "zero_stage3_tuned_config.json").read_text())
    zs, zt = shipped.pop("zero_optimization"), tuned.pop("zero_optimization")
    assert shipped == tuned
    changed = {k for k in zt if zs.get(k) != zt[k]}
    assert changed <= {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                       "stage3_max_reuse_distance", "leaf_module"}
    zero = DeepSpeedZeroConfig(**zt)
    assert set(zero.leaf_module.classes) == {"InternVisionEncoderLayer", "LlamaDecoderLayer"}
    # at least one Yi-34B decoder layer (7168 hidden, 20480 MLP, GQA 8 KV heads) can be prefetched while one is live
    yi_layer = 2 * 7168 * 7168 + 2 * 7168 * 1024 + 3 * 7168 * 20480
    assert zero.prefetch_bucket_size >= yi_layer and zero.max_live_parameters >= 2 * yi_layer


def test_stage2_engine_fsdp2_passes_the_fsdp2_config_instead_of_deepspeed(tmp_path):
    (call,) = _run_recipe(tmp_path, "medrega_stage2.sh:full", {"ENGINE": "fsdp2"})
    argv = call[call.index("internvl.train") + 1:]
    assert "--deepspeed" not in argv
    assert argv[argv.index("--fsdp") + 1] == "full_shard" and argv[argv.index("--bf16") + 1] == "True"
    config = Path(argv[argv.index("--fsdp_config") + 1])
    assert config == SHELL / "fsdp2_config.json"
    i = argv.index("--bf16")
    _, _, training_args = parse_args(argv[:i] + argv[i + 2:])  # bf16 needs a GPU to validate; the FSDP flags do not
    plugin = training_args.fsdp_plugin_args  # what the Trainer hands accelerate
    assert plugin["fsdp_version"] == 2 and plugin["reshard_after_forward"] is True
    assert plugin["transformer_cls_names_to_wrap"] == "InternVisionEncoderLayer,LlamaDecoderLayer"


def test_stage2_engine_rejects_unknown_and_fsdp2_with_a_deepspeed_config(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    for extra, message in (({"ENGINE": "megatron"}, "expected deepspeed or fsdp2"),
                           ({"ENGINE": "fsdp2", "DS_CONFIG": str(SHELL / "zero_stage3_config.json")}, "no DS_CONFIG")):
        env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", GPUS_PER_NODE="1", BATCH_SIZE="16",
                   PER_DEVICE_BATCH_SIZE="4", OUTPUT=str(tmp_path / "o"), MEDREGA_DEVICE="cuda", **extra)
        result = subprocess.run(["bash", str(SHELL / "medrega_stage2.sh")], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr, result.stderr
