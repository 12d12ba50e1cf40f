#!/usr/bin/env python3
"""Export a trained MedReg-mini run as the bundled model directory: bf16 safetensors in shards of at most 15 MB,
config.json, generation settings and the SentencePiece tokenizer; nothing pickled (no training_args.bin).

    python3 scripts/export_medreg_mini_model.py --run RUN_DIR --tokenizer INIT_DIR --out asset/medreg-mini-model
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from internvl.model import InternVLChatModel
from internvl.tokenization import load_tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="medrega-train output_dir")
    p.add_argument("--tokenizer", type=Path, required=True, help="directory with the SentencePiece tokenizer")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--max-shard-size", default="15MB")
    args = p.parse_args(argv)


    model = InternVLChatModel.from_pretrained(str(args.run), dtype=torch.bfloat16, local_files_only=True,
                                              use_safetensors=True)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    model.save_pretrained(args.out, safe_serialization=True, max_shard_size=args.max_shard_size)
    for name in TOKENIZER_FILES:
        src = args.tokenizer / name
        if not src.is_file():
            raise SystemExit(f"{src}: missing tokenizer file")
        shutil.copy(src, args.out / name)
    load_tokenizer(args.out)  # fails loudly if the copy is incomplete
    for name in ("run_config.json", "train_results.json"):
        if (args.run / name).is_file():
            shutil.copy(args.run / name, args.out / f"training_{name}")
    files = {f.name: f.stat().st_size for f in sorted(args.out.iterdir())}
    print(json.dumps({"out": str(args.out), "files": files, "total_mb": round(sum(files.values()) / 2**20, 1)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
