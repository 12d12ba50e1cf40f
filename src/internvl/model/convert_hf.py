"""Convert an original-layout InternVL-Chat / MedRegA checkpoint directory to transformers' native
`InternVLForConditionalGeneration` layout (keys renamed, ViT qkv split; see internvl.model.hf_conversion).

    medrega-convert-hf SRC_DIR DST_DIR [--image-token-id 64000] [--allow-v1]

The logic lives in `internvl.model.hf_conversion.convert_checkpoint_to_hf`; this module is only the command line.
DST is checked before any work (not SRC, not inside or around it, not a file, empty unless `--overwrite`) and
written to a temporary folder that is renamed into place at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from internvl.cli_support import non_negative_int, run_cli
from internvl.io_safety import check_output_dir, staged_output_dir
from internvl.offline import enforce_offline

from .hf_conversion import convert_checkpoint_to_hf


def main(argv: list[str] | None = None) -> int:
    """`medrega-convert-hf`: convert SRC to DST; 0 on success, 2 with a one-line error on bad input or a refused
    output path."""
    return run_cli("medrega-convert-hf", _main, argv)


def _main(argv: list[str] | None) -> int:
    enforce_offline()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="original-layout checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", type=Path, help="output directory for the native transformers layout")
    parser.add_argument("--image-token-id", type=non_negative_int, default=None,
                        help="id of <IMG_CONTEXT> (default: read from the tokenizer files in SRC)")
    parser.add_argument("--allow-v1", action="store_true",
                        help="convert a ps_version v1 checkpoint although the native model orders tokens as v2")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    args = parser.parse_args(argv)
    check_output_dir(args.dst, inputs=[args.src], overwrite=args.overwrite, what="DST")
    with staged_output_dir(args.dst, overwrite=args.overwrite) as staging:
        convert_checkpoint_to_hf(args.src, staging, image_token_id=args.image_token_id, allow_v1=args.allow_v1)
    out = args.dst
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
