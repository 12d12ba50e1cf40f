"""Data-parallel training on the CPU (gloo), in real processes: 2 ranks under torchrun (DDP, DeepSpeed ZeRO-2 and
ZeRO-3 through DeepSpeed's CPU accelerator) give the same per-step losses as 1 process with gradient accumulation
over the same global batch (the loss is divided by the supervised tokens of the whole step, over micro-batches and
ranks), and DeepSpeed gets the same weight-decay groups as the path without it (no decay for norms and biases). The
same holds for the opt-in engines: ZeRO-3 with the layers as leaf modules (zero_stage3_tuned_config.json) and
FSDP2 (fsdp2_config.json, `ENGINE=fsdp2`)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.testing.square_task import write_square_dataset

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    return write_square_dataset(tmp_path_factory.mktemp("squares"), n=16, seed=0)


def train_args(out: Path, tok: Path, meta: Path, per_device: int, acc: int, *extra: str) -> list[str]:
    """The tiny preset, fp32 on the CPU, with weight decay (so the decay groups matter) and no dropout anywhere."""
    return ["--preset", "tiny", "--tokenizer_path", str(tok), "--meta_path", str(meta), "--output_dir", str(out),
            "--max_steps", str(STEPS), "--per_device_train_batch_size", str(per_device),
            "--gradient_accumulation_steps", str(acc), "--learning_rate", "2e-3", "--weight_decay", "0.05",
            "--warmup_steps", "0", "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none",
            "--use_cpu", "True", "--seed", "7", "--disable_tqdm", "True", "--max_seq_length", "512",
            "--grad_checkpoint", "False", "--dataloader_num_workers", "0", *extra]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK",
                                                                  "WORLD_SIZE"))}
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", GLOO_SOCKET_IFNAME="lo")
    return e


def run(cmd: list[str], log: Path) -> str:
    with open(log, "w") as fh:
        result = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), cwd=ROOT, timeout=240)
    text = log.read_text()
    assert result.returncode == 0, text[-4000:]
    return text


def losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def groups_line(log: str) -> str:
    (line,) = re.findall(r"optimizer parameter groups: (.*)", log)
    return line


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_tokenizer_dir, squares) -> tuple[list[float], str]:
    """1 process, micro-batch 2 x accumulation 2 (global batch 4): the reference curve and its decay groups."""
    tmp = tmp_path_factory.mktemp("one")
    log = run([sys.executable, "-m", "internvl.train",
               *train_args(tmp / "out", tiny_tokenizer_dir, squares, 2, 2)], tmp / "log.txt")
    return losses(tmp / "out"), groups_line(log), tmp / "out"


@pytest.fixture(scope="module")
def deepspeed_cpu_comm() -> None:
    """DeepSpeed's CPU accelerator builds its shared-memory communication op on first use (cached in
    ~/.cache/torch_extensions; about 1-2 minutes on 2 busy cores, once per machine). Built here, in a subprocess (no
    DeepSpeed state in this process), so that the timing of the tests below is their own."""
    code = ("from deepspeed.accelerator import get_accelerator\n"
            "builder = get_accelerator().create_op_builder('ShareMemCommBuilder')\n"
            "if builder is not None:\n    builder.load()\n")
    subprocess.run([sys.executable, "-c", code], env=env(), check=True, capture_output=True, timeout=600)


def engine_flags(tmp: Path, engine: str) -> list[str]:
    """medrega-train's flags for `engine`: DDP (none), a ZeRO stage, the tuned ZeRO-3 config (layers as leaf
    modules) or FSDP2 (`ENGINE=fsdp2` of the recipes)."""
    if engine == "ddp":
        return []
    if engine == "fsdp2":
        return ["--fsdp", "full_shard", "--fsdp_config", str(ROOT / "src" / "shell" / "fsdp2_config.json")]
    name = {"zero2": "zero_stage2_config", "zero3": "zero_stage3_config",
            "zero3_tuned": "zero_stage3_tuned_config"}[engine]
    config = json.loads((ROOT / "src" / "shell" / f"{name}.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True  # DeepSpeed's fused Adam needs a CUDA build
    path = tmp / f"{engine}.json"
    path.write_text(json.dumps(config))
    return ["--deepspeed", str(path)]


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "zero3_tuned", "fsdp2"])
def test_two_ranks_match_one_process_with_accumulation(tmp_path, tiny_tokenizer_dir, squares, one_process, engine,
                                                       request):
    reference, reference_groups, reference_dir = one_process
    if engine.startswith("zero"):
        request.getfixturevalue("deepspeed_cpu_comm")
    assert len(reference) == STEPS
    extra = engine_flags(tmp_path, engine)
    log = run(["torchrun", "--standalone", "--nproc-per-node=2", "-m", "internvl.train",
               *train_args(tmp_path / "out", tiny_tokenizer_dir, squares, 2, 1, *extra)], tmp_path / "log.txt")
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())["resolved"]["world_size"] == 2
    if engine == "fsdp2":  # accelerate drops FSDP on the CPU; MedRegTrainer puts it back (compat.fsdp_on_cpu)
        assert "FSDP2 on the CPU (gloo): accelerate's FSDP plugin installed" in log
    got = losses(tmp_path / "out")
    assert got == pytest.approx(reference, rel=1e-4, abs=1e-5), (got, reference)
    assert groups_line(log) == reference_groups  # the same decay / no-decay split, DeepSpeed or not
    assert "weight_decay 0.0:" in reference_groups  # norms and biases exist and are kept out of decay
    # the final save holds whole tensors (ZeRO-3 gathered, FSDP2 full state dict) equal to the 1-process model's
    saved, ref = _weights(tmp_path / "out"), _weights(reference_dir)
    assert saved.keys() == ref.keys()
    for name, tensor in saved.items():
        assert tensor.shape == ref[name].shape, name
        assert (tensor.float() - ref[name].float()).abs().mean() < 1e-5, name


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(run_dir.glob("*.safetensors"))
    assert files, f"{run_dir}: no safetensors written"
    return {k: v for f in files for k, v in load_file(f).items()}


def test_fsdp2_two_ranks_resume_continues_exactly(tmp_path, tiny_tokenizer_dir, squares):
    """FSDP2 really sharded on 2 CPU ranks (compat.fsdp_on_cpu): a run resumed from its step-4 checkpoint logs the
    same losses for steps 5-8 as the uninterrupted run (sharded optimizer state, scheduler and RNG restored)."""
    import shutil

    fsdp = engine_flags(tmp_path, "fsdp2")

    def train(out: Path, *extra: str) -> str:
        args = train_args(out, tiny_tokenizer_dir, squares, 2, 1, *fsdp, *extra)
        args[args.index("--max_steps") + 1] = "8"
        args[args.index("--save_strategy") + 1] = "steps"
        return run(["torchrun", "--standalone", "--nproc-per-node=2", "-m", "internvl.train", *args, "--save_steps",
                    "4"], out.with_suffix(".log"))

    log = train(tmp_path / "straight")
    assert "FSDP2 on the CPU (gloo)" in log
    shutil.copytree(tmp_path / "straight" / "checkpoint-4", tmp_path / "resumed" / "checkpoint-4")
    train(tmp_path / "resumed", "--resume_from_checkpoint", "auto")
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert len(straight) == 8 and resumed[4:] == pytest.approx(straight[4:], rel=1e-6, abs=1e-7), (resumed, straight)


def test_fsdp2_two_ranks_lora_matches_ddp_and_merges(tmp_path, tiny_tokenizer_dir, squares):
    """The paper's LoRA recipe under FSDP2 really sharded on 2 CPU ranks: the same losses as DDP on 2 ranks (both
    within 1e-3 of 1 process with accumulation: Adam magnifies the summation-order differences of the LoRA factors'
    first, tiny gradients), and adapters saved whole that `medrega-merge-lora --verify` merges into the base."""
    lora = ["--use_llm_lora", "4", "--freeze_llm", "True", "--freeze_backbone", "True"]

    def two_ranks(name: str, *extra: str) -> str:
        return run(["torchrun", "--standalone", "--nproc-per-node=2", "-m", "internvl.train",
                    *train_args(tmp_path / name, tiny_tokenizer_dir, squares, 2, 1, *lora, *extra)],
                   tmp_path / f"{name}.log")

    run([sys.executable, "-m", "internvl.train",
         *train_args(tmp_path / "one", tiny_tokenizer_dir, squares, 2, 2, *lora)], tmp_path / "one.log")
    two_ranks("ddp")
    assert "FSDP2 on the CPU (gloo)" in two_ranks("fsdp2", *engine_flags(tmp_path, "fsdp2"))
    fsdp2 = losses(tmp_path / "fsdp2")
    assert fsdp2 == pytest.approx(losses(tmp_path / "ddp"), rel=1e-5, abs=1e-6)
    assert fsdp2 == pytest.approx(losses(tmp_path / "one"), rel=1e-3)
    merged = run([sys.executable, "-m", "internvl.train.merge_lora", "--run_dir", str(tmp_path / "fsdp2"),
                  "--output_dir", str(tmp_path / "merged"), "--verify"], tmp_path / "merge.log")
    assert "max |logit difference| adapter vs merged" in merged
