"""A 2-"node" slurm job on one machine, through the stage-2 recipe: fake `srun` (starts its command once per node,
with that node's SLURMD_NODENAME) and `scontrol` on PATH, launch.sh's c10d rendezvous, gloo on the CPU. Both nodes
must train (one rank each, world size 2), and the per-step losses must equal the same recipe run as one process
with gradient accumulation over the same global batch."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from internvl.testing.square_task import write_square_dataset

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "src" / "shell" / "medrega_stage2.sh"

FAKE_SRUN = '''#!/usr/bin/env python3
"""srun stand-in: --nodes=N starts the command N times (one "node" each) and fails if any node fails."""
import os, subprocess, sys
args = sys.argv[1:]
nodes = 1
while args and args[0].startswith("--"):
    if args[0].startswith("--nodes="):
        nodes = int(args[0].split("=", 1)[1])
    args = args[1:]
procs = []
for node in range(nodes):
    env = dict(os.environ, SLURMD_NODENAME="127.0.0.1", SLURM_NODEID=str(node), SLURM_PROCID=str(node))
    log = open(os.path.join(os.environ["FAKE_SLURM_LOGS"], f"node{node}.log"), "w")
    procs.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
sys.exit(max(p.wait() for p in procs))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp: Path, out: Path, tok: Path, meta: Path, slurm: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK",
                                                                    "WORLD_SIZE", "MEDREGA_NO_SLURM"))}
    env.update(MODEL="preset:tiny", TOKENIZER=str(tok), META=str(meta), OUTPUT=str(out), IMAGE_SIZE="56",
               BATCH_SIZE="4", PER_DEVICE_BATCH_SIZE="2", GPUS_PER_NODE="1", MEDREGA_DEVICE="cpu",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               GLOO_SOCKET_IFNAME="lo")
    if slurm:
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        (bin_dir / "srun").write_text(FAKE_SRUN)
        (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\necho 127.0.0.1\necho 127.0.0.2\n")
        for tool in ("srun", "scontrol"):
            (bin_dir / tool).chmod(0o755 | stat.S_IEXEC)
        env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SLURM_JOB_ID="4711", SLURM_NNODES="2",
                   SLURM_JOB_NODELIST="fake[1-2]", SLURM_CPUS_PER_TASK="1", MASTER_PORT=str(_free_port()),
                   FAKE_SLURM_LOGS=str(tmp))
    flags = ["--max_steps", "3", "--report_to", "none", "--save_strategy", "no", "--dataloader_num_workers", "0",
             "--grad_checkpoint", "False", "--group_by_length", "False", "--max_seq_length", "512",
             "--disable_tqdm", "True", "--seed", "5", "--learning_rate", "2e-3", "--warmup_ratio", "0"]
    return subprocess.run(["bash", str(RECIPE), *flags], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=300)


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def test_two_slurm_nodes_train_like_one_process(tmp_path, tiny_tokenizer_dir):
    meta = write_square_dataset(tmp_path / "data", n=12, seed=1)
    two = tmp_path / "two_nodes"
    two.mkdir()
    result = _run(two, two / "out", tiny_tokenizer_dir, meta, slurm=True)
    logs = [(two / f"node{i}.log").read_text() for i in (0, 1)]
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    assert "[recipe] global batch 4 = 2 per process x 2 processes (2 node(s) x 1) x 1 accumulation" in result.stdout
    config = json.loads((two / "out" / "run_config.json").read_text())
    assert config["resolved"]["world_size"] == 2 and config["training"]["gradient_accumulation_steps"] == 1
    for log in logs:  # each node ran a training rank (its local main process logs: log_on_each_node)
        assert "optimizer parameter groups" in log and log.count("{'loss': ") == 3, log[-3000:]
    one = tmp_path / "one_process"
    one.mkdir()
    result = _run(one, one / "out", tiny_tokenizer_dir, meta, slurm=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    reference = _losses(one / "out")
    assert json.loads((one / "out" / "run_config.json").read_text())["training"]["gradient_accumulation_steps"] == 2
    assert len(reference) == 3
    assert _losses(two / "out") == pytest.approx(reference, rel=1e-4, abs=1e-5)
