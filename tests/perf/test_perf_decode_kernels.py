"""Guards for the Triton decode kernels (internvl/ops/decode_kernels.py).

The kernels themselves run on the CPU through Triton's interpreter in a subprocess (TRITON_INTERPRET must be set
before Triton is imported): decode_kernel_cases.py. In this process (no interpreter, no CUDA) the custom ops fall
back to their PyTorch references, which must give the same results, and they must trace under dynamo."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from internvl.ops import decode_kernels as dk

CASES = Path(__file__).with_name("decode_kernel_cases.py")


def test_triton_kernels_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-p", "no:xdist",
                           str(CASES)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_fallbacks_on_a_device_without_triton_match_torch():
    assert not dk.triton_ready(torch.zeros(1))  # CPU without the interpreter
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(1, 1, 24, generator=g), torch.randn(10, 24, generator=g), torch.randn(10, generator=g)
    torch.testing.assert_close(dk.gemv(x, w, b), torch.nn.functional.linear(x, w, b))
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    mask = torch.ones(1, 20, dtype=torch.long)
    out = dk.gqa_decode_attention(q, k, v, mask, torch.tensor([12]), 0.25)
    kk, vv = k[:, :, :13].repeat_interleave(2, 1), v[:, :, :13].repeat_interleave(2, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, scale=0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_custom_ops_trace_in_one_graph():
    def step(x, w, q, k, v, mask, limit):
        a = torch.ops.internvl.gqa_decode_attention(q, k, v, mask, limit, 0.25)
        return torch.ops.internvl.gemv(a.reshape(1, 1, -1), w, None) + x

    args = (torch.randn(1, 1, 8), torch.randn(8, 64), torch.randn(1, 4, 1, 16), torch.randn(1, 2, 20, 16),
            torch.randn(1, 2, 20, 16), torch.ones(1, 20, dtype=torch.long), torch.tensor([19]))
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(*args), step(*args))

