"""Convert an original-layout InternVL-Chat / MedRegA checkpoint directory to transformers' native
`InternVLForConditionalGeneration` layout (keys renamed, ViT qkv split; see internvl.model.hf_conversion).

    medrega-convert-hf SRC_DIR DST_DIR [--image-token-id 64000] [--allow-v1]

The logic lives in `internvl.model.hf_conversion.convert_checkpoint_to_hf`; this module is only the command line.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .hf_conversion import ConversionError, convert_checkpoint_to_hf
from .loading import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """`medrega-convert-hf`: convert SRC to DST; 0 on success, 2 with a one-line error on a bad checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="original-layout checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", type=Path, help="output directory for the native transformers layout")
    parser.add_argument("--image-token-id", type=int, default=None,
                        help="id of <IMG_CONTEXT> (default: read from the tokenizer files in SRC)")
    parser.add_argument("--allow-v1", action="store_true",
                        help="convert a ps_version v1 checkpoint although the native model orders tokens as v2")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint_to_hf(args.src, args.dst, image_token_id=args.image_token_id, allow_v1=args.allow_v1)
    except (ConversionError, CheckpointError) as exc:
        print(f"medrega-convert-hf: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
