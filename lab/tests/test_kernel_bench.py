"""The benchmark's kernels section (lab/bench/kernel_bench.py): the decode step's products and the table."""
from internvl.model import load_preset
from lab.bench.kernel_bench import kernel_lines, layer_products


def test_kernel_bench_shapes_and_table():
    """The kernels section times the products one decode step runs (q/k/v and gate/up packed) and prints them."""
    shapes = layer_products(load_preset("medrega").llm_config)
    assert shapes == {"qkv": (9216, 7168), "o": (7168, 7168), "gate_up": (40960, 7168), "down": (7168, 20480),
                      "lm_head": (64007, 7168)}
    res = {"kernels": {"mid": {
        "gemv": [{"product": "o", "rows": 2048, "inputs": 2048, "MB": 8.4, "ours_max_rel_err": 2e-3,
                  "ours_us": 4.0, "ours_TBps": 2.1, "cublas_us": 8.0, "cublas_TBps": 1.05, "inductor_error": "x",
                  "int8_us": 2.5, "int8_TBps": 1.7, "int8_config": "2/2048/8", "int8_launch_us": 2.1,
                  "int8_max_rel_err": 4e-3},
                 {"product": "tuned configs", "configs": {"2048x2048 bfloat16": "1/512/2"}}],
        "attention": [{"batch": 1, "cache": 640, "ours_max_abs_err": 1e-3, "ours_us": 5.0, "sdpa_us": 10.0}]}}}
    text = "\n".join(kernel_lines(res))
    assert "ours    4.00 us 2.10 TB/s" in text and "inductor ERROR" in text and "2048x2048 bfloat16: 1/512/2" in text
    assert "| int8    2.50 us 1.70 TB/s (2/2048/8; launch alone 2.10 us) err 4.0e-03" in text
    assert "attention batch   1 cache   640: ours 5.0 us, sdpa 10.0 us (2.00x)" in text
