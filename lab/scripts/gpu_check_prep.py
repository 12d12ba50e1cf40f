#!/usr/bin/env python3
"""Inputs for the GPU training checks (lab/scripts/gpu_train_check.sh, lab/scripts/gpu_multi_train_check.sh) in one
folder: the tiny SentencePiece tokenizer, the synthetic 448 px bright-square Text-to-Region set, and copies of the ZeRO-2/3
configs that use torch's AdamW inside DeepSpeed (no CUDA extension build on a bare machine).

    python -m lab.scripts.gpu_check_prep /tmp/gpu_check      # from the repository root; prints the meta file path
"""
import json
import sys
from pathlib import Path

from internvl.testing import build_tiny_tokenizer_dir, write_square_dataset

ROOT = Path(__file__).resolve().parents[2]

work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
build_tiny_tokenizer_dir(work / "tok")
for stage in (2, 3):
    cfg = json.loads((ROOT / "src" / "shell" / f"zero_stage{stage}_config.json").read_text())
    cfg["optimizer"]["params"]["torch_adam"] = True
    (work / f"zero{stage}.json").write_text(json.dumps(cfg, indent=1))
print(write_square_dataset(work / "data", n=int(sys.argv[2]) if len(sys.argv) > 2 else 96, seed=0, size=448))
