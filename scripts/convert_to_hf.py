#!/usr/bin/env python3
"""Convert an original-layout InternVL-Chat / MedRegA checkpoint directory to transformers' native
`InternVLForConditionalGeneration` layout (keys renamed, ViT qkv split; see internvl.model.hf_conversion).

    python scripts/convert_to_hf.py SRC_DIR DST_DIR [--image-token-id 64000] [--allow-v1]

The logic lives in `internvl.model.hf_conversion.convert_checkpoint_to_hf` so tests exercise the same code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from internvl.offline import enforce_offline  # noqa: E402

enforce_offline()  # before transformers is imported (it reads the offline switches at import)

from internvl.model.hf_conversion import ConversionError, convert_checkpoint_to_hf
from internvl.model.loading import CheckpointError


def main(argv: list[str] | None = None) -> int:
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
        print(f"convert_to_hf: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
