"""`medrega-train` end to end on the tiny preset (random init + tiny tokenizer) in subprocesses:
output layout, run config, logs, and SIGKILL + resume reproducing the uninterrupted loss curve."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from internvl.train.checkpoint import find_latest_checkpoint, is_complete

from internvl.testing.square_task import write_square_dataset

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def square_meta(tmp_path_factory) -> Path:
    return write_square_dataset(tmp_path_factory.mktemp("squares"), n=12, seed=0)


def cli_args(out: Path, tokenizer_dir: Path, meta: Path, max_steps: int, *extra: str) -> list[str]:
    return ["--preset", "tiny", "--tokenizer_path", str(tokenizer_dir), "--meta_path", str(meta),
            "--output_dir", str(out), "--max_steps", str(max_steps), "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "2", "--learning_rate", "2e-3", "--warmup_steps", "2",
            "--lr_scheduler_type", "cosine", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1",
            "--use_cpu", "True", "--seed", "7", "--disable_tqdm", "True", "--max_seq_length", "512",
            "--grad_checkpoint", "False", *extra]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    return e


def run_cli(args: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as fh:
        return subprocess.run([sys.executable, "-m", "internvl.train", *args], stdout=fh, stderr=subprocess.STDOUT,
                              env=env(), cwd=ROOT, timeout=600)


def losses(output_dir: Path) -> dict[int, float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.mark.parametrize("variant", [[], ["--use_llm_lora", "4", "--freeze_llm", "True", "--freeze_backbone", "True"]],
                         ids=["full", "lora"])
def test_sigkill_and_resume_reaches_the_same_loss(tmp_path, tiny_tokenizer_dir, square_meta, variant):
    steps = 16
    straight = tmp_path / "straight"
    result = run_cli(cli_args(straight, tiny_tokenizer_dir, square_meta, steps, "--report_to", "none", *variant),
                     tmp_path / "straight.log")
    assert result.returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]
    reference = losses(straight)
    assert sorted(reference) == list(range(1, steps + 1))

    killed = tmp_path / "killed"
    args = cli_args(killed, tiny_tokenizer_dir, square_meta, steps, "--report_to", "none", *variant)
    with open(tmp_path / "killed.log", "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "internvl.train", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=env(), cwd=ROOT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (killed / "checkpoint-8").is_dir():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    latest = find_latest_checkpoint(killed)
    assert latest is not None and is_complete(latest)
    resumed_from = int(latest.name.split("-")[1])
    assert 8 <= resumed_from < steps

    result = run_cli(args + ["--resume_from_checkpoint", "auto"],
                     tmp_path / "resumed.log")
    assert result.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    resumed = losses(killed)
    run_config = json.loads((killed / "run_config.json").read_text())
    assert run_config["resolved"]["resumed_from"] == str(latest)
    for step in range(resumed_from + 1, steps + 1):
        assert abs(resumed[step] - reference[step]) <= 1e-5, (step, resumed[step], reference[step])


def test_full_run_writes_original_layout_config_and_logs(tmp_path, tiny_tokenizer_dir, square_meta):
    from internvl.model import InternVLChatModel

    out = tmp_path / "run"
    result = run_cli(cli_args(out, tiny_tokenizer_dir, square_meta, 6, "--report_to", "tensorboard",
                              "--save_total_limit", "1"), tmp_path / "run.log")
    log = (tmp_path / "run.log").read_text()
    assert result.returncode == 0, log[-3000:]
    model, info = InternVLChatModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert any(k.startswith("language_model.model.layers.0.self_attn.q_proj") for k in model.state_dict())
    assert (out / "tokenizer_config.json").is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["model"]["preset"] == "tiny" and config["data"]["meta_path"] == str(square_meta)
    assert config["training"]["max_steps"] == 6 and config["resolved"]["num_train_samples"] == 12
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-6"]  # saved at 4 and at the end; limit 1
    assert not any((out / ".staging").iterdir())
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert {"loss", "learning_rate", "grad_norm"} <= set(logged[-1])
    assert logged[-1]["tokens_per_second"] > 0 and logged[-1]["samples_per_second"] > 0
    assert list((out / "runs").rglob("events.out.tfevents.*")) or list(out.rglob("events.out.tfevents.*"))


def test_cli_refuses_to_overwrite_checkpoints_and_bad_flags(tmp_path, tiny_tokenizer_dir, square_meta):
    from internvl.train.cli import main

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-3" / "COMPLETE").write_text("ok")
    assert main(cli_args(tmp_path, tiny_tokenizer_dir, square_meta, 2)) == 2
    assert main(["--meta_path", str(square_meta), "--output_dir", str(tmp_path)]) == 2  # neither preset nor model
    assert main(["--preset", "tiny", "--meta_path", str(square_meta), "--output_dir", str(tmp_path)]) == 2
