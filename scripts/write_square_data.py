#!/usr/bin/env python3
"""Write the synthetic bright-square Text-to-Region set (tests/train/square_task.py) for smoke/throughput runs.

    python scripts/write_square_data.py --out /tmp/squares --n 64 --size 448   # prints the meta file path
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from train.square_task import write_square_dataset  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--n", type=int, default=64)
parser.add_argument("--size", type=int, default=448)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
print(write_square_dataset(args.out, n=args.n, seed=args.seed, size=args.size))
