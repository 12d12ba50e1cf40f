"""Checkpoint manifests: every file kind of a real checkpoint, corrupted in the test (bytes flipped, truncated, emptied,
removed), is named and the newest good checkpoint is resumed instead; explicit resume of a bad or unverifiable
checkpoint is refused with exit code 2; rotation never deletes the newest good checkpoint."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.train import checkpoint as ckpt
from internvl.train.cli import main
from internvl.train.manifest import MANIFEST_NAME, merge_manifests, rank_of, verify_manifest, write_rank_manifest
from internvl.train.trainer import MedRegTrainer

from .test_train_cli_resume import ROOT, cli_args, env
from .test_train_guards import IndexedDataset
from .test_train_trainer_core import args, tiny_llama
from internvl.testing.square_task import write_square_dataset

FILES = ["model.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json"]


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(4):
        data[len(data) // 2 + i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def remove(path: Path) -> None:
    path.unlink()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, pad_text_batch) -> Path:
    """A real run directory with checkpoint-2 and checkpoint-4 written by MedRegTrainer."""
    out = tmp_path_factory.mktemp("run")
    collate = pad_text_batch
    trainer = MedRegTrainer(model=tiny_llama(), train_dataset=IndexedDataset(16), data_collator=collate,
                            args=args(out, learning_rate=1e-2, max_steps=4, save_strategy="steps", save_steps=2))
    trainer.train()
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    return out


@pytest.mark.parametrize("damage", [flip, truncate, empty, remove])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_file_is_named_and_the_previous_checkpoint_used(run_dir, tmp_path, name, damage):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    damage(out / "checkpoint-4" / name)
    chosen, problems = ckpt.select_resume_checkpoint(out)
    assert chosen == out / "checkpoint-2"
    assert problems and all(str(out / "checkpoint-4") in p for p in problems)
    assert any(str(out / "checkpoint-4" / name) in p for p in problems), problems
    rejected = out / "checkpoint-4.rejected"
    assert rejected.is_dir() and not (out / "checkpoint-4").exists()
    assert (rejected / "REJECTED.txt").read_text().strip() == "\n".join(problems)
    assert [p.name for _, p in ckpt.list_checkpoints(out)] == ["checkpoint-2"]


def test_a_good_run_verifies_and_rank_files_are_split(run_dir):
    assert ckpt.select_resume_checkpoint(run_dir, move_aside=False) == (run_dir / "checkpoint-4", [])
    assert rank_of("rng_state_3.pth") == 3 and rank_of("rng_state.pth") == 0
    assert rank_of("global_step8/bf16_zero_pp_rank_5_mp_rank_00_optim_states.pt") == 5
    assert rank_of("global_step8/mp_rank_00_model_states.pt") == 0


def test_per_rank_parts_merge_into_one_manifest(tmp_path):
    ck = tmp_path / "checkpoint-1"
    (ck / "global_step1").mkdir(parents=True)
    for rel in ["model.safetensors", "rng_state_0.pth", "rng_state_1.pth",
                "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt", "extra.txt"]:
        (ck / rel).write_bytes(rel.encode() * 3)
    part1 = json.loads(write_rank_manifest(ck, rank=1, world_size=2).read_text())
    assert set(part1) == {"rng_state_1.pth", "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    write_rank_manifest(ck, rank=0, world_size=2)
    (ck / "late.bin").write_bytes(b"x")  # written after the parts: the merge still hashes it
    merge_manifests(ck)
    files = json.loads((ck / MANIFEST_NAME).read_text())["files"]
    assert len(files) == 6 and not list(ck.glob("manifest.rank*"))
    assert verify_manifest(ck) == [] and verify_manifest(ck, rank=1, world_size=2) == []
    flip(ck / "global_step1" / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    assert verify_manifest(ck, rank=0, world_size=2) == []  # rank 0 does not read rank 1's files
    assert "corrupted" in verify_manifest(ck, rank=1, world_size=2)[0]


@pytest.mark.parametrize("manifest", ["missing", "garbage", "escapes"])
def test_a_checkpoint_without_a_valid_manifest_is_refused(run_dir, tmp_path, manifest):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    path = out / "checkpoint-4" / MANIFEST_NAME
    if manifest == "missing":
        path.unlink()
    elif manifest == "garbage":
        path.write_text("{not json")
    else:
        data = json.loads(path.read_text())
        data["files"]["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
        path.write_text(json.dumps(data))
    problems = verify_manifest(out / "checkpoint-4")
    assert len(problems) == 1 and str(path) in problems[0]
    assert ckpt.select_resume_checkpoint(out)[0] == out / "checkpoint-2"


def cli_check(out: Path, resume: str, *extra: str) -> list[str]:
    """Flags that reach the resume check (which runs before any model or data is loaded)."""
    return ["--preset", "tiny", "--tokenizer_path", "unused", "--meta_path", "unused.json", "--output_dir", str(out),
            "--resume_from_checkpoint", resume, "--use_cpu", "True", "--report_to", "none", *extra]


def test_cli_refuses_a_bad_explicit_checkpoint_and_a_dir_where_none_verifies(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    truncate(out / "checkpoint-4" / "optimizer.pt")
    assert main(cli_check(out, str(out / "checkpoint-4"))) == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and f"{out / 'checkpoint-4' / 'optimizer.pt'}: " in err
    assert "Traceback" not in err
    assert (out / "checkpoint-4").is_dir()  # an explicit checkpoint is named, not moved
    empty(out / "checkpoint-2" / "scheduler.pt")
    assert main(cli_check(out, "auto")) == 2
    err = capsys.readouterr().err
    assert "no checkpoint verifies" in err and "scheduler.pt" in err and "optimizer.pt" in err


def fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    (path / ckpt.COMPLETE_MARKER).write_text("ok\n")
    return path


def test_rotation_never_deletes_the_newest_good_checkpoint(tmp_path):
    for step in (2, 4, 10):
        fake_checkpoint(tmp_path, step)
    ckpt.reject_checkpoint(fake_checkpoint(tmp_path, 12), ["bad"])
    good = fake_checkpoint(tmp_path, 6)  # just written by a run that resumed from checkpoint-4
    deleted = ckpt.rotate_checkpoints(tmp_path, 1, keep=good)
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-4"]
    assert good.is_dir() and (tmp_path / "checkpoint-10").is_dir() and (tmp_path / "checkpoint-12.rejected").is_dir()


def test_cli_resume_after_flipped_bytes_uses_the_previous_checkpoint(tmp_path, tiny_tokenizer_dir):
    """The reported failure: flipped bytes in checkpoint-4 + resume auto + save_total_limit 1 gave NaN losses and
    deleted the good checkpoint-2."""
    meta = write_square_dataset(tmp_path / "data", n=8, seed=0)
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "internvl.train",
                            *cli_args(out, tiny_tokenizer_dir, meta, 4, "--report_to", "none", "--save_steps", "2")],
                           capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    flip(out / "checkpoint-4" / "model.safetensors")
    second = subprocess.run([sys.executable, "-m", "internvl.train",
                             *cli_args(out, tiny_tokenizer_dir, meta, 6, "--report_to", "none", "--save_steps", "2",
                                       "--resume_from_checkpoint", "auto", "--save_total_limit", "1")],
                            capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert f"{out / 'checkpoint-4' / 'model.safetensors'}: SHA-256 differs" in log
    config = json.loads((out / "run_config.json").read_text())
    assert config["resolved"]["resumed_from"] == str(out / "checkpoint-2")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4.rejected", "checkpoint-6"]
    assert verify_manifest(out / "checkpoint-6") == []
    state = json.loads((out / "trainer_state.json").read_text())
    assert all(0 < e["loss"] < 20 for e in state["log_history"] if "loss" in e)
    assert not (out / "training_args.bin").exists() and (out / "training_args.json").is_file()


@pytest.mark.slow
def test_two_ranks_hash_and_verify_their_own_files(tmp_path, tiny_tokenizer_dir):
    """Two CPU processes (torchrun, gloo): each rank's RNG file is in the one manifest, and a corrupted rank-1 file is
    found on resume (by rank 1, gathered to every rank) and its checkpoint moved aside."""
    meta = write_square_dataset(tmp_path / "data", n=8, seed=0)
    out = tmp_path / "run"

    def torchrun(steps: int, *extra: str) -> subprocess.CompletedProcess:
        argv = cli_args(out, tiny_tokenizer_dir, meta, steps, "--report_to", "none", "--save_steps", "2", *extra)
        # --standalone: a free rendezvous port per run (a fixed one collides with other runs on a shared machine)
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               "-m", "internvl.train", *argv],
                              capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)

    first = torchrun(2)
    assert first.returncode == 0, first.stderr[-3000:]
    files = json.loads((out / "checkpoint-2" / MANIFEST_NAME).read_text())["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "model.safetensors"} <= set(files)
    flip(out / "checkpoint-2" / "rng_state_1.pth")
    second = torchrun(4, "--resume_from_checkpoint", "auto", "--overwrite_output_dir", "True")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{out / 'checkpoint-2' / 'rng_state_1.pth'}: SHA-256 differs" in second.stdout + second.stderr
    assert (out / "checkpoint-2.rejected").is_dir() and verify_manifest(out / "checkpoint-4") == []
