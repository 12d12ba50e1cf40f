"""No entry point reaches the network: every console script (read from setup.py, so new ones are covered), the demo
and the user scripts run `--help` and a tiny real command in a subprocess whose sockets may only reach loopback.

The subprocess gets tests/netguard/ on PYTHONPATH (its ``sitecustomize.py`` refuses and records every connection or
name lookup outside 127.0.0.0/8 and ::1) and none of the offline switches in its environment, so each entry point
must set them itself (``internvl.offline.enforce_offline``). A refused attempt is recorded even when the library
catches the error and carries on (bitsandbytes' kernel fetch does), so "no attempt" is asserted, not just exit 0.
The real commands chain like a user's session: check the data, fine-tune the bundled model one LoRA step, merge,
convert, answer a batch with the merged model, list the benchmarks.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from internvl.offline import OFFLINE_ENVIRONMENT

pytestmark = pytest.mark.xdist_group("offline")  # one worker trains once (scripts/test.sh: --dist loadgroup)

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).resolve().parent / "netguard"
BUNDLED_MODEL = ROOT / "asset" / "medreg-mini-model"


def console_scripts() -> dict[str, str]:
    """``name -> module:function`` of every console script declared in setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            entry_points = ast.literal_eval(node.value)
            return dict(item.replace(" ", "").split("=", 1) for item in entry_points["console_scripts"])
    raise AssertionError("setup.py declares no entry_points")


@dataclass
class GuardedRun:
    returncode: int
    output: str
    attempts: list[str]

    def check(self) -> None:
        """Exit 0 and not one refused network attempt."""
        assert not self.attempts, "network attempts:\n" + "\n".join(a[:600] for a in self.attempts)
        assert self.returncode == 0, self.output[-4000:]


def run_guarded(command: list[str], workdir: Path, cwd: Path | None = None) -> GuardedRun:
    """Run ``command`` (arguments after the interpreter; in ``cwd``, default ``workdir``) with non-loopback sockets
    refused and logged (the log goes to ``workdir``)."""
    log = workdir / f"netguard-{len(list(workdir.glob('netguard-*')))}.log"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENVIRONMENT}
    env.update(PYTHONPATH=os.pathsep.join([str(NETGUARD), env.get("PYTHONPATH", "")]),
               MEDREGA_NETGUARD_LOG=str(log), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, *command], cwd=cwd or workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    attempts = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return GuardedRun(proc.returncode, proc.stdout + proc.stderr, attempts)


def console_command(name: str, args: list[str]) -> list[str]:
    """What the installed ``name`` wrapper does: import the entry point and exit with its return value."""
    module, function = console_scripts()[name].split(":")
    code = (f"import sys; from importlib import import_module; sys.argv[0] = {name!r}; "
            f"sys.exit(import_module({module!r}).{function}())")
    return ["-c", code, *args]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Two grounding records on one image, their meta file, and the directory the commands write to."""
    ws = tmp_path_factory.mktemp("offline")
    Image.new("RGB", (64, 64), (20, 20, 20)).save(ws / "scan.png")
    records = [{"id": i, "image": "scan.png", "width": 64, "height": 64, "conversations": [
        {"from": "human", "value": "<image>\nPlease locate <ref>liver</ref> in this image."},
        {"from": "gpt", "value": "<ref>liver</ref><box>[[100, 200, 500, 600]]</box>"}]} for i in range(2)]
    (ws / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    meta = {"tiny": {"root": str(ws), "annotation": str(ws / "records.jsonl"), "data_augment": False,
                     "repeat_time": 1, "length": 2, "base_prompt": ""}}
    (ws / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return ws


@pytest.fixture(scope="module")
def lora_run(workspace: Path) -> tuple[Path, GuardedRun]:
    """One LoRA step of `medrega-train` on the bundled model (the train command, and the input of merge)."""
    out = workspace / "lora_run"
    result = run_guarded(console_command("medrega-train", [
        "--model_name_or_path", str(BUNDLED_MODEL), "--meta_path", str(workspace / "meta.json"),
        "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "1", "--use_cpu", "True",
        "--report_to", "none", "--use_llm_lora", "4", "--freeze_backbone", "True", "--freeze_mlp", "True",
        "--freeze_llm", "True", "--save_strategy", "no", "--disable_tqdm", "True", "--grad_checkpoint", "False",
        "--max_seq_length", "512"]), workspace)
    return out, result


@pytest.fixture(scope="module")
def merged_model(workspace: Path, lora_run: tuple[Path, GuardedRun]) -> Path:
    """The LoRA run merged (offline) by `medrega-merge-lora`."""
    run_dir, trained = lora_run
    trained.check()
    out = workspace / "merged"
    args = ["--run_dir", str(run_dir), "--output_dir", str(out)]
    run_guarded(console_command("medrega-merge-lora", args), workspace).check()
    return out


# A tiny real command for every console script; a new console script must add one here.
REAL_COMMANDS: dict[str, Callable[[Path], list[str]]] = {
    "medrega-data": lambda ws: ["check", str(ws / "records.jsonl"), "--image-root", str(ws), "--images", "decode"],
    "medrega-eval": lambda ws: ["list"],
    "medrega-merge-lora": lambda ws: ["--run_dir", str(ws / "lora_run"), "--output_dir", str(ws / "merged_cli")],
    "medrega-convert-hf": lambda ws: [str(ws / "merged"), str(ws / "hf_cli"), "--allow-v1"],
}
NEEDS_MERGED = {"medrega-merge-lora", "medrega-convert-hf"}


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_script_help_is_offline(name: str, tmp_path: Path):
    result = run_guarded(console_command(name, ["--help"]), tmp_path)
    result.check()
    assert "usage" in result.output.lower()


@pytest.mark.parametrize("name", sorted(console_scripts()))
def test_console_script_real_command_is_offline(name: str, workspace: Path, lora_run, request):
    if name == "medrega-train":
        run_dir, result = lora_run
        result.check()
        assert (run_dir / "lora_run.json").is_file(), result.output[-2000:]
        return
    assert name in REAL_COMMANDS, f"add a tiny real command for the new console script {name} to REAL_COMMANDS"
    if name in NEEDS_MERGED:
        request.getfixturevalue("merged_model")
    run_guarded(console_command(name, REAL_COMMANDS[name](workspace)), workspace).check()


# The user scripts that are not console scripts: the demo (a file) and the MedReg-mini builder (a module of the
# repository's `scripts` package, run from the repository root).
SCRIPTS = {"demo.py": [str(ROOT / "src" / "demo.py")], "build_medreg_mini": ["-m", "scripts.build_medreg_mini"]}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_script_help_is_offline(script: str, tmp_path: Path):
    run_guarded([*SCRIPTS[script], "--help"], tmp_path, cwd=ROOT).check()


def test_merge_and_demo_batch_are_offline(workspace: Path, merged_model: Path):
    """`medrega-merge-lora` ran in the fixture; the demo's --batch answers with its output."""
    assert (merged_model / "config.json").is_file()
    out = workspace / "demo_out"
    run_guarded([str(ROOT / "src" / "demo.py"), "--model", str(merged_model), "--batch",
                 str(workspace / "records.jsonl"), "--out", str(out), "--max-new-tokens", "4"], workspace).check()
    assert list(out.glob("demo_*.json"))


def test_the_guard_refuses_and_records_non_loopback_connections(tmp_path: Path):
    """The guard itself: loopback works, another address and a name lookup are refused before any packet leaves."""
    code = """
import socket
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
socket.create_connection(server.getsockname(), timeout=5).close()
attempts = [lambda: socket.create_connection(("192.0.2.1", 9), timeout=1),
            lambda: socket.socket().connect(("192.0.2.1", 9)),
            lambda: socket.create_connection(("example.invalid", 80), timeout=1)]
for attempt in attempts:
    try:
        attempt()
    except OSError as exc:
        assert "netguard" in str(exc), exc
    else:
        raise SystemExit("not refused")
"""
    result = run_guarded(["-c", code], tmp_path)
    assert result.returncode == 0, result.output
    kinds = [line.split(" ", 2)[:2] for line in result.attempts]
    assert kinds == [["getaddrinfo", "'192.0.2.1'"], ["connect", "('192.0.2.1',"], ["getaddrinfo", "'example.invalid'"]]
