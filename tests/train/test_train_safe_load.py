"""Trust boundary of resume: DeepSpeed's states load with `weights_only=True` (a small allowlist of plain DeepSpeed
classes), a state that names anything else is refused with a one-line error (exit 2) and nothing in it runs -- even
when the attacker rewrote the manifest to match -- and the trainer writes no pickled `training_args.bin`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl.train.manifest import merge_manifests
from internvl.train.safe_load import UnsafeCheckpointError, deepspeed_safe_loads, safe_torch_load

from internvl.testing.square_task import write_square_dataset
from .test_train_cli_resume import ROOT, cli_args, env


class Touch:
    """A pickle that creates a file when unpickled: stands for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_safe_load_refuses_code_and_loads_tensors(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"state": Touch(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pt: refusing to unpickle"):
        safe_torch_load(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "good.pt")
    assert safe_torch_load(tmp_path / "good.pt")["step"] == 3


def test_context_swaps_deepspeed_loader_and_restores_it():
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    original = TorchCheckpointEngine.load
    with deepspeed_safe_loads():
        assert TorchCheckpointEngine.load is not original
    assert TorchCheckpointEngine.load is original


def ds_config(path: Path) -> Path:
    config = json.loads((ROOT / "src/shell/zero_stage2_config.json").read_text())
    config["optimizer"]["params"]["torch_adam"] = True  # no CUDA toolkit on the test machine
    config["zero_optimization"]["overlap_comm"] = False
    path.write_text(json.dumps(config))
    return path


def run(argv: list[str], port: int) -> subprocess.CompletedProcess:
    e = env()
    e.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    return subprocess.run([sys.executable, "-m", "internvl.train", *argv], capture_output=True, text=True, env=e,
                          cwd=ROOT, timeout=300)


def test_deepspeed_resume_loads_safely_and_refuses_a_tampered_state(tmp_path, tiny_tokenizer_dir, monkeypatch):
    meta = write_square_dataset(tmp_path / "data", n=8, seed=0)
    out = tmp_path / "run"
    flags = ("--report_to", "none", "--save_steps", "2", "--deepspeed", str(ds_config(tmp_path / "ds.json")))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")  # DeepSpeed's op builder cannot parse it: medrega-train mends it
    first = run(cli_args(out, tiny_tokenizer_dir, meta, 2, *flags), 29611)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "TORCH_CUDA_ARCH_LIST set to '9.0'" in first.stdout + first.stderr
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    checkpoint = out / "checkpoint-2"
    assert not list(out.rglob("training_args.bin")) and (checkpoint / "training_args.json").is_file()
    good = run(cli_args(tmp_path / "copy", tiny_tokenizer_dir, meta, 4, *flags, "--resume_from_checkpoint",
                        str(checkpoint)), 29612)
    assert good.returncode == 0, good.stderr[-3000:]  # ZeRO-2 optimizer + model states load under weights_only=True

    marker = tmp_path / "ran"
    optim = next(checkpoint.glob("global_step2/*optim_states.pt"))
    state = torch.load(optim, weights_only=False)
    state["evil"] = Touch(marker)
    torch.save(state, optim)
    merge_manifests(checkpoint)  # the attacker rewrites the manifest too: it verifies, and still nothing runs
    bad = run(cli_args(out, tiny_tokenizer_dir, meta, 4, *flags, "--resume_from_checkpoint", "auto"), 29613)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert f"{optim}: refusing to unpickle" in bad.stderr and "Traceback" not in bad.stderr
    assert not marker.exists()
