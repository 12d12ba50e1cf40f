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
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(CASES.parents[2] / "src"), str(CASES.parents[1]), os.environ.get("PYTHONPATH", "")])}
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


def test_kernel_bench_shapes_and_table():
    """The kernels section times the products one decode step runs (q/k/v and gate/up packed) and prints them."""
    from lab.bench.kernel_bench import kernel_lines, layer_products
    from internvl.model import load_preset

    shapes = layer_products(load_preset("medrega").llm_config)
    assert shapes == {"qkv": (9216, 7168), "o": (7168, 7168), "gate_up": (40960, 7168), "down": (7168, 20480),
                      "lm_head": (64007, 7168)}
    res = {"kernels": {"mid": {
        "gemv": [{"product": "o", "rows": 2048, "inputs": 2048, "MB": 8.4, "ours_max_rel_err": 2e-3,
                  "ours_us": 4.0, "ours_TBps": 2.1, "cublas_us": 8.0, "cublas_TBps": 1.05, "inductor_error": "x"},
                 {"product": "tuned configs", "configs": {"2048x2048 bfloat16": "1/512/2"}}],
        "attention": [{"batch": 1, "cache": 640, "ours_max_abs_err": 1e-3, "ours_us": 5.0, "sdpa_us": 10.0}]}}}
    text = "\n".join(kernel_lines(res))
    assert "ours    4.00 us 2.10 TB/s" in text and "inductor ERROR" in text and "2048x2048 bfloat16: 1/512/2" in text
    assert "attention batch   1 cache   640: ours 5.0 us, sdpa 10.0 us (2.00x)" in text
