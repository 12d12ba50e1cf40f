"""docs/training.md §1 runs exactly as written: the fenced block after `<!-- cpu-walkthrough -->` (check, LoRA
fine-tune of the bundled model through the stage-2 recipe on the CPU, merge, evaluate) is taken from the Markdown and
run by bash in a scratch directory that sees the repository's `asset/`, `src/` and `scripts/` (so the docs cannot
drift from the code and the run writes nothing into the checkout)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "training.md"
MARKER = "<!-- cpu-walkthrough -->"


def walkthrough_block(markdown: str) -> str:
    """The bash block that directly follows the marker (exactly one marker, one block)."""
    assert markdown.count(MARKER) == 1, f"{DOC}: expected one {MARKER}"
    match = re.search(re.escape(MARKER) + r"\s*```bash\n(.*?)```", markdown, re.S)
    assert match, f"{DOC}: no ```bash block right after {MARKER}"
    return match.group(1)


def test_the_documented_cpu_walkthrough_runs_as_written(tmp_path):
    block = walkthrough_block(DOC.read_text(encoding="utf-8"))
    assert "--max_steps" in block  # the doc itself keeps the run short
    for name in ("asset", "src", "scripts"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "CUDA_VISIBLE"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.monotonic()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    print(f"walk-through: {time.monotonic() - start:.0f} s")

    assert "device cpu" in log and "trainable parameters per tower" in log
    assert "also train in full" not in log  # LoRA alone: only the adapters train
    run = tmp_path / "runs" / "my_lora"
    config = json.loads((run / "run_config.json").read_text())
    assert config["training"]["bf16"] is False and config["training"]["use_cpu"] is True
    assert not config["training"].get("deepspeed")
    towers = config["resolved"]["trainable_by_tower"]
    assert towers["lora"]["trainable"] == config["resolved"]["trainable_params"] > 0
    state = json.loads((run / "trainer_state.json").read_text())
    steps = [e for e in state["log_history"] if "loss" in e]
    assert len(steps) == config["training"]["max_steps"] and all(e["loss"] > 0 for e in steps)
    assert (run / "adapters" / "language_model" / "adapter_model.safetensors").is_file()
    merged = tmp_path / "runs" / "my_merged"
    assert (merged / "config.json").is_file() and list(merged.glob("*.safetensors"))
    assert "max |logit difference| adapter vs merged" in log
    summary = json.loads((tmp_path / "runs" / "eval_merged" / "my_head_text2region" / "summary.json").read_text())
    assert summary["counts"]["scored"] == 3 and summary["iou"] is not None
    assert not (tmp_path / "asset" / "examples" / "finetune" / "runs").exists()
