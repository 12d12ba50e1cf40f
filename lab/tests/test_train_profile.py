"""The full training-step profile (lab/bench/train_profile.py): interval union, busy/idle windows and the
kernel categories on synthetic events, the reduction of a synthetic trace, and CPU smoke runs of the profiler and
of the bench's `--train-profile-full` hook."""
import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from internvl.model import load_preset
from lab.bench import batches as B
from lab.bench.build import build_ours
from lab.bench.cli import main
from lab.bench.train_bench import ours_loss
from lab.bench.train_profile import (
    CATEGORIES,
    CATEGORY_RULES,
    STEP_MARKER,
    Span,
    _mean_breakdown,
    device_spans,
    is_device_kernel,
    kernel_category,
    profile_case,
    profile_full_step,
    reduce_trace,
    report_text,
    summary_line,
    top_kernels,
    union_length,
    window_breakdown,
)


def ev(name, start, end, activity="kernel", device="DeviceType.CUDA", annotation=False):
    """A stand-in for a torch.profiler FunctionEvent (the attributes the reduction reads)."""
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end), activity_type=activity,
                           device_type=device, is_user_annotation=annotation)


@pytest.mark.parametrize("intervals, length", [
    ([], 0.0),
    ([(0, 10)], 10.0),
    ([(0, 10), (5, 15)], 15.0),  # overlap
    ([(0, 10), (2, 4), (3, 8)], 10.0),  # nested
    ([(0, 2), (5, 6), (9, 12)], 6.0),  # gaps
    ([(0, 2), (2, 5)], 5.0),  # touching
    ([(9, 12), (0, 2), (1, 3)], 6.0),  # unsorted
    ([(4, 4), (0, 1)], 1.0),  # an instant adds nothing
])
def test_union_length(intervals, length):
    assert union_length(intervals) == pytest.approx(length)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 12), st.sampled_from(["nvjet_a", "triton_b", "x"])),
                max_size=12))
def test_window_breakdown_matches_a_grid_count(items):
    """Integer intervals: busy = covered unit cells, the split adds up to busy, wall = busy + idle parts."""
    spans = [Span(n, float(s), float(s + d)) for s, d, n in items]
    lo, hi = 5.0, 45.0
    cells = {c for sp in spans for c in range(int(sp.start_us), int(sp.end_us)) if lo <= c < hi}
    r = window_breakdown(spans, lo, hi)
    assert r["busy_ms"] * 1e3 == pytest.approx(len(cells))
    assert sum(r["categories_ms"].values()) == pytest.approx(r["busy_ms"])
    assert r["wall_ms"] == pytest.approx(r["busy_ms"] + r["idle_ms"])
    if r["kernels"]:
        assert r["idle_ms"] == pytest.approx(r["lead_ms"] + r["gaps_ms"] + r["tail_ms"])
        assert sum(r["gap_buckets_ms"].values()) == pytest.approx(r["gaps_ms"])
    assert r["overlap_ms"] >= -1e-9
    assert union_length([(max(s.start_us, lo), min(s.end_us, hi)) for s in spans
                         if s.end_us > lo and s.start_us < hi]) == pytest.approx(r["busy_ms"] * 1e3)


def test_window_breakdown_overlap_nesting_and_gaps_by_hand():
    spans = [
        Span("nvjet_tst_128x256", 0, 10),
        Span("ampere_bf16_s16816gemm_bf16", 2, 5),  # nested in the first
        Span("triton_poi_fused_add_0", 8, 14),  # overlaps the first
        Span("Memcpy DtoD (Device -> Device)", 20, 22),  # after a 6 us gap
        Span("triton_red_fused_sum_1", 200, 300),  # outside the window
        Span("triton_per_fused_mean_2", -5, -1),  # ends where the window starts
    ]
    r = window_breakdown(spans, -1, 25)
    assert r["wall_ms"] == pytest.approx(0.026)
    assert r["busy_ms"] == pytest.approx(0.016)  # [0, 14] + [20, 22]
    assert r["idle_ms"] == pytest.approx(0.010)
    assert (r["lead_ms"], r["gaps_ms"], r["tail_ms"]) == pytest.approx((0.001, 0.006, 0.003))
    assert r["gap_buckets_ms"] == pytest.approx({"<10us": 0.006, "10-100us": 0.0, ">=100us": 0.0})
    # [0,8] gemm only; [8,10] gemm and triton share; [10,14] triton; [20,22] memcpy
    assert r["categories_ms"] == pytest.approx({"attention": 0, "gemm": 0.009, "optimizer": 0, "triton": 0.005,
                                                "memcpy": 0.002, "other": 0})
    assert r["kernel_sum_ms"] == pytest.approx(0.021) and r["overlap_ms"] == pytest.approx(0.005)
    assert r["kernels"] == 4
    # a kernel crossing the window start counts only its part inside; an empty window is all idle
    assert window_breakdown([Span("nvjet_x", -5, 3)], 0, 10)["busy_ms"] == pytest.approx(0.003)
    empty = window_breakdown([], 0, 1000)
    assert empty["busy_ms"] == 0 and empty["idle_frac"] == 1.0 and empty["kernels"] == 0
    assert window_breakdown(spans, 0, 10)["gap_buckets_ms"][">=100us"] == 0
    big_gap = window_breakdown([Span("a", 0, 1), Span("b", 151, 152), Span("c", 170, 171)], 0, 171)
    assert big_gap["gap_buckets_ms"] == pytest.approx({"<10us": 0.0, "10-100us": 0.018, ">=100us": 0.15})
    with pytest.raises(ValueError):
        window_breakdown(spans, 10, 0)
    with pytest.raises(ValueError):
        Span("bad", 5, 4)


@pytest.mark.parametrize("name, category", [
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT", "gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm"),
    ("ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_32x32_128x2_tn_align8>(Params)", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16>(cublasLt::cublasSplitKParams<float>)",
     "gemm"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, float, 128, 16, 4, 4, false>(...)", "gemm"),
    ("triton_tem_fused_mm_3", "gemm"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, cutlass::bfloat16_t>>",
     "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k128_sm80", "attention"),  # mentions cutlass, still attention
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1", "attention"),
    ("flex_attention_kernel_0", "attention"),
    ("triton_tem_fused_flex_attention_backward_5", "attention"),
    (("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
      "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, 1, false>>"),
     "optimizer"),
    ("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0", "triton"),
    ("triton_poi_fused_cat_silu_1", "triton"),
    ("Memcpy DtoD (Device -> Device)", "memcpy"),
    ("Memset (Device)", "memcpy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ("_rms_norm_forward_kernel", "other"),
    ("hadamard_transform_kernel", "other"),
])
def test_kernel_category(name, category):
    assert kernel_category(name) == category


def test_category_table_is_well_formed():
    names = [c for c, _ in CATEGORY_RULES]
    assert len(set(names)) == len(names) and "other" not in names and CATEGORIES[-1] == "other"
    for _, patterns in CATEGORY_RULES:
        assert patterns and all(p == p.lower() for p in patterns)  # names are lower-cased before matching


def test_device_kernel_filter_drops_annotations_and_cpu_rows():
    events = [
        ev("nvjet_tst_1", 10, 20),
        ev("Memcpy HtoD (Pageable -> Device)", 1, 3, activity="gpu_memcpy"),
        ev("Memset (Device)", 4, 5, activity="gpu_memset"),
        ev("Torch-Compiled Region: 0/1", 0, 50, activity="gpu_user_annotation", annotation=True),
        ev("## Call CompiledFxGraph ##", 0, 50, activity="gpu_user_annotation", annotation=True),
        ev("aten::mm", 0, 9, activity="cpu_op", device="DeviceType.CPU"),
        ev("cudaLaunchKernel", 2, 3, activity="cuda_runtime", device="DeviceType.CPU"),
        # no activity_type (older torch): device + not an annotation
        ev("triton_poi_fused_0", 30, 31, activity=None),
        ev("Torch-Compiled Region: 2/0", 25, 40, activity=None, annotation=True),
        ev("aten::add", 0, 1, activity=None, device="DeviceType.CPU"),
    ]
    assert [s.name for s in device_spans(events)] == ["Memcpy HtoD (Pageable -> Device)", "Memset (Device)",
                                                      "nvjet_tst_1", "triton_poi_fused_0"]
    assert not is_device_kernel(ev(f"{STEP_MARKER}#0", 0, 9, activity="gpu_user_annotation", annotation=True))


def test_top_kernels_aggregate_calls_and_means():
    spans = [Span("nvjet_a", 0, 10), Span("nvjet_a", 20, 40), Span("triton_b", 50, 55), Span("x", 60, 61)]
    top = top_kernels(spans, 2, steps=2)
    assert [t["name"] for t in top] == ["nvjet_a", "triton_b"]
    assert top[0]["calls"] == 2 and top[0]["calls_per_step"] == 1.0
    assert top[0]["total_ms"] == pytest.approx(0.03) and top[0]["ms_per_step"] == pytest.approx(0.015)
    assert top[0]["mean_us"] == pytest.approx(15.0) and top[0]["category"] == "gemm"


def synthetic_trace():
    """Two steps: step 0 [0, 100] ms, step 1 [200, 400] ms, with kernels (and annotations to ignore); times in us."""
    ms = 1000.0
    return [
        ev(f"{STEP_MARKER}#1", 200 * ms, 400 * ms, activity="user_annotation", device="DeviceType.CPU"),
        ev(f"{STEP_MARKER}#0", 0, 100 * ms, activity="user_annotation", device="DeviceType.CPU"),
        ev(f"{STEP_MARKER}#0", 5 * ms, 95 * ms, activity="gpu_user_annotation", annotation=True),
        ev("Torch-Compiled Region: 0/0", 5 * ms, 95 * ms, activity="gpu_user_annotation", annotation=True),
        ev("nvjet_tst_1", 10 * ms, 60 * ms),
        ev("pytorch_flash::flash_fwd_kernel", 60 * ms, 80 * ms),
        ev("nvjet_tst_1", 210 * ms, 260 * ms),
        ev("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 300 * ms, 390 * ms),
        ev("aten::mm", 10 * ms, 12 * ms, activity="cpu_op", device="DeviceType.CPU"),
    ]


def test_reduce_trace_per_step_and_report():
    per_step, top, has_device = reduce_trace(synthetic_trace(), 2, top=5)
    assert has_device
    s0, s1 = per_step
    assert (s0["wall_ms"], s0["busy_ms"], s0["lead_ms"], s0["tail_ms"]) == pytest.approx((100, 70, 10, 20))
    assert s0["categories_ms"]["gemm"] == pytest.approx(50) and s0["categories_ms"]["attention"] == pytest.approx(20)
    assert (s1["wall_ms"], s1["busy_ms"], s1["gaps_ms"]) == pytest.approx((200, 140, 40))
    assert s1["categories_ms"]["optimizer"] == pytest.approx(90)
    assert s1["gap_buckets_ms"][">=100us"] == pytest.approx(40)
    assert top[0]["name"] == "nvjet_tst_1" and top[0]["calls"] == 2 and top[0]["calls_per_step"] == 1.0
    with pytest.raises(RuntimeError, match="step markers"):
        reduce_trace(synthetic_trace(), 3)

    result = {"steps": 2, "device": "cuda:0", "device_events": True, "host_ms_per_step": 150.0, "per_step": per_step,
              "mean": _mean_breakdown(per_step), "top_kernels": top, "cpu_self_ms_per_step": 0.1, "loss_last": 1.0}
    assert result["mean"]["busy_ms"] == pytest.approx(105)
    text = report_text(result)
    assert "nvjet_tst_1" in text and "optimizer" in text and "mean" in text
    json.dumps(result)  # JSON-able
    line = summary_line("ours ckpt=off", result, 158.0)
    assert line == ("full step ours ckpt=off: wall 150.0 ms (timed 158.0), busy 105.0 ms, idle 30.0% (lead 10.0, "
                    "gaps 20.0, tail 15.0) | ms: attention 10.0 gemm 50.0 optimizer 45.0 triton 0.0 memcpy 0.0 "
                    "other 0.0")


@pytest.fixture(scope="module")
def tiny_setup():
    cfg = load_preset("tiny", ps_version="v2")
    model = build_ours(cfg, device="cpu", dtype=torch.float32, seed=0)
    vocab = cfg.llm_config.vocab_size
    model.img_context_token_id = vocab - 1
    batches = [B.fixed_batch(2, 48, vocab=vocab, image_token_id=vocab - 1, num_image_token=cfg.num_image_token,
                             image_size=cfg.force_image_size, answer_from=30, seed=i) for i in range(2)]
    return model, batches


def test_profile_full_step_on_cpu(tiny_setup, tmp_path):
    model, batches = tiny_setup
    loss_fn = lambda m, b: ours_loss(m, b, fast=False)  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    path = tmp_path / "full.txt"
    r = profile_case(model, loss_fn, batches, path, steps=3)
    assert r["device_events"] is False and r["steps"] == 3 and len(r["per_step"]) == 3
    assert all(s["wall_ms"] > 0 and s["busy_ms"] is None and s["idle_ms"] is None for s in r["per_step"])
    assert r["mean"]["busy_ms"] is None and r["top_kernels"] == [] and r["cpu_self_ms_per_step"] > 0
    assert r["mean"]["wall_ms"] == pytest.approx(sum(s["wall_ms"] for s in r["per_step"]) / 3)
    assert torch.isfinite(torch.tensor(r["loss_last"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the optimizer stepped
    assert all(p.grad is None for p in model.parameters())
    text = path.read_text()
    assert "no device kernels" in text and "CPU ops" in text and "aten::mm" in text
    json.dumps(r)
    assert "no device kernels in the trace" in summary_line("ours ckpt=off", r)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    with pytest.raises(ValueError):
        profile_full_step(model, loss_fn, batches, opt, path, steps=0)
    with pytest.raises(ValueError):
        profile_full_step(model, loss_fn, [], opt, path)


@pytest.mark.slow
def test_bench_train_profile_full_hook_on_cpu(tmp_path):
    rc = main(["--device", "cpu", "--preset", "tiny", "--sections", "train", "--batch", "1", "--seq", "330",
               "--steps", "1", "--warmup", "1", "--train-variants", "default:off", "--train-profile-full",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert not res.get("errors"), res.get("errors")
    assert set(res["train_full_profiles"]) == {"native ckpt=off", "ours ckpt=off"}
    for p in res["train_full_profiles"].values():
        assert p["steps"] == 3 and p["device_events"] is False and p["mean"]["wall_ms"] > 0
    assert (tmp_path / "profile_full_default_ckpt_off.txt").exists()
    assert (tmp_path / "profile_full_native_ckpt_off.txt").exists()
    table = (tmp_path / "bench_table.txt").read_text()
    assert "full step ours ckpt=off: wall" in table and "full step native ckpt=off: wall" in table
