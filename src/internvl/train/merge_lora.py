"""Merge a LoRA run of `medrega-train` into a full checkpoint in the original InternVL-Chat layout.

    medrega-merge-lora --run_dir runs/medrega_stage2_lora --output_dir merged/medrega-lora
    medrega-merge-lora --run_dir runs/x/checkpoint-1300 --base_model /ckpt/InternVL-Chat-V1-2 --output_dir m/

The run holds `adapters/<part>/` (PEFT), `non_lora_trainables.safetensors` and `lora_run.json` (naming the base).
The result loads with zero missing keys; `--verify` also compares the logits of the adapter and the merged model on a
random input. The output may not be (or lie inside, or contain) the run or the base, must be empty unless
`--overwrite`, and is written to a temporary folder renamed into place only when it loads cleanly.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..offline import enforce_offline

enforce_offline()  # before peft is imported (bitsandbytes' CPU backend asks the hub for kernels at import)

from ..cli_support import run_cli  # noqa: E402
from ..io_safety import check_output_dir, staged_output_dir  # noqa: E402
from ..model import InternVLChatModel  # noqa: E402
from .lora import load_base, load_lora_run, merge_lora_run, read_lora_info  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def verify(run_dir: Path, merged_dir: Path, base_model: str | None, dtype: torch.dtype) -> float:
    """Max |logit difference| between base+adapters and the merged checkpoint on random token ids."""
    merged = InternVLChatModel.from_pretrained(str(merged_dir), dtype=dtype).eval()
    vocab = merged.get_input_embeddings().weight.shape[0]
    adapter = load_base(_base_of(run_dir, base_model), dtype, vocab).eval()
    load_lora_run(adapter, run_dir)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = adapter(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    return float((a - b).abs().max())


def _base_of(run_dir: Path, base_model: str | None) -> str | None:
    """The base checkpoint the merge reads: --base_model, else the run's lora_run.json (which must exist)."""
    return base_model or read_lora_info(run_dir)[1].get("base_model")


def main(argv: list[str] | None = None) -> int:
    """`medrega-merge-lora`: merge, optionally verify; 0 on success, 2 with one line on stderr for bad input or a
    refused output path, 1 on a failed check."""
    return run_cli("medrega-merge-lora", _main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True, type=Path, help="LoRA run output dir or one of its checkpoints")
    parser.add_argument("--output_dir", required=True, type=Path, help="where the merged checkpoint goes")
    parser.add_argument("--base_model", default=None, help="base checkpoint dir (default: from lora_run.json)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the merge and output")
    parser.add_argument("--verify", action="store_true", help="compare adapter vs merged logits (loads twice)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    args = parser.parse_args(argv)
    base = _base_of(args.run_dir, args.base_model)
    check_output_dir(args.output_dir, inputs=[args.run_dir, base], overwrite=args.overwrite, what="--output_dir")
    with staged_output_dir(args.output_dir, overwrite=args.overwrite) as staging:
        merge_lora_run(args.run_dir, staging, base_model=args.base_model, dtype=DTYPES[args.dtype])
    out = args.output_dir
    print(f"merged checkpoint written to {out}")
    if args.verify:
        diff = verify(args.run_dir, out, args.base_model, DTYPES[args.dtype])
        print(f"max |logit difference| adapter vs merged: {diff:.3e}")
        if diff > 1e-4 and args.dtype == "float32":
            print("medrega-merge-lora: error: logits differ by more than 1e-4", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
