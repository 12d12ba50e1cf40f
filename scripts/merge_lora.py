#!/usr/bin/env python3
"""Merge a LoRA run of `medrega-train` into a full checkpoint in the original InternVL-Chat layout.

    python scripts/merge_lora.py --run_dir runs/medrega_stage2_lora --output_dir merged/medrega-lora
    python scripts/merge_lora.py --run_dir runs/x/checkpoint-1300 --base_model /ckpt/InternVL-Chat-V1-2 --output_dir m/

The run directory holds `adapters/<part>/` in PEFT format, `non_lora_trainables.safetensors` and `lora_run.json`
(which names the base checkpoint). The result loads with `InternVLChatModel.from_pretrained` with zero missing keys.
`--verify` also compares the logits of the adapter model and the merged model on a random text input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from internvl.offline import enforce_offline  # noqa: E402

enforce_offline()  # before peft is imported (bitsandbytes' CPU backend asks the hub for kernels at import)

from internvl.train.lora import load_lora_run, merge_lora_run  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def verify(run_dir: Path, merged_dir: Path, base_model: str | None, dtype: torch.dtype) -> float:
    """Max |logit difference| between base+adapters and the merged checkpoint on random token ids."""
    import json

    from internvl.model import InternVLChatModel
    from internvl.tokenization import resize_embeddings_mean

    base = base_model or json.loads((run_dir / "lora_run.json").read_text())["base_model"]
    merged = InternVLChatModel.from_pretrained(str(merged_dir), dtype=dtype).eval()
    adapter = InternVLChatModel.from_pretrained(base, dtype=dtype).eval()
    vocab = merged.get_input_embeddings().weight.shape[0]
    if adapter.get_input_embeddings().weight.shape[0] != vocab:
        resize_embeddings_mean(adapter, vocab)
    load_lora_run(adapter, run_dir)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = adapter(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    return float((a - b).abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, type=Path, help="LoRA run output dir or one of its checkpoints")
    parser.add_argument("--output_dir", required=True, type=Path, help="where the merged checkpoint goes")
    parser.add_argument("--base_model", default=None, help="base checkpoint dir (default: from lora_run.json)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the merge and output")
    parser.add_argument("--verify", action="store_true", help="compare adapter vs merged logits (loads twice)")
    args = parser.parse_args(argv)
    try:
        out = merge_lora_run(args.run_dir, args.output_dir, base_model=args.base_model, dtype=DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as exc:
        print(f"merge_lora: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    if args.verify:
        diff = verify(args.run_dir, out, args.base_model, DTYPES[args.dtype])
        print(f"max |logit difference| adapter vs merged: {diff:.3e}")
        if diff > 1e-4 and args.dtype == "float32":
            print("merge_lora: error: logits differ by more than 1e-4", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
