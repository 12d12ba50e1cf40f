"""Benchmark building blocks on the CPU: FLOPs formula, IU length mix, synthetic batches, meta-device builds,
greedy-settings parsing, and a smoke run of the whole CLI on the tiny preset."""
import json
import math

import pytest
import torch

from internvl.model import InternVLChatModel, load_preset
from internvl.model.decode_config import greedy_settings, trim_after_eos
from lab.bench import batches as B
from lab.bench.build import build_native, build_ours, native_config
from lab.bench.cli import main
from lab.bench.flops import decode_weight_bytes, forward_flops, linear_params, mfu, shape_of, train_step_flops
from lab.bench.lengths import estimate_tokens, iu_report_token_lengths, sample_mix
from lab.bench.train_bench import (
    GRAPH_STEP_VARIANTS,
    ours_loss,
    parse_train_variants,
    profile_graph_step_case,
    run_train_case,
)


@pytest.fixture(scope="module")
def tiny_v2():
    return load_preset("tiny", ps_version="v2")


@pytest.fixture(scope="module")
def ours(tiny_v2):
    return build_ours(tiny_v2, device="cpu", dtype=torch.float32, seed=0)


def test_meta_build_is_finite_and_matches_native_sizes(tiny_v2, ours):
    assert all(torch.isfinite(p).all() for p in ours.parameters())
    native, copied = build_native(tiny_v2, image_token_id=1008, device="cpu", dtype=torch.float32)
    assert not copied
    native_copy, copied = build_native(tiny_v2, image_token_id=1008, device="cpu", dtype=torch.float32, copy_from=ours)
    assert copied
    ours.img_context_token_id = 1008
    ids = torch.randint(10, 900, (2, 20), generator=torch.Generator().manual_seed(0))
    ids[:, 2:6] = 1008
    pix = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(pixel_values=pix, input_ids=ids, image_flags=torch.ones(2)).logits
        b = native_copy(input_ids=ids, pixel_values=pix).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert sum(p.numel() for p in native.parameters()) == sum(p.numel() for p in ours.parameters())
    cfg = native_config(tiny_v2, image_token_id=1008)
    assert cfg.vision_config.use_qk_norm and cfg.vision_config.norm_type == "rms_norm"
    assert cfg.text_config.num_hidden_layers == tiny_v2.llm_config.num_hidden_layers
    rope = ours.language_model.get_decoder().rotary_emb
    assert torch.isfinite(rope.inv_freq).all() and rope.inv_freq[0] == 1.0


def test_flops_formula_by_hand(ours, tiny_v2):
    s = shape_of(ours)
    llm = tiny_v2.llm_config
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128  # q,o + k,v (2 kv heads x 16) + gate/up/down
    assert s.p_llm == llm.num_hidden_layers * per_layer
    assert s.p_head == 64 * llm.vocab_size and s.n_img_tok == 4 and s.n_vit == 17
    f = forward_flops(s, tokens=10, supervised=4, doc_lengths=[6, 4], images=1)
    attn = 4 * s.d_attn * s.l_llm * (21 + 10)
    vit = 2 * s.p_vit * 17 + 4 * 32 * 2 * 17**2 + 2 * s.p_patch * 16 + 2 * s.p_mlp1 * 4
    assert f == pytest.approx(2 * s.p_llm * 10 + 2 * s.p_head * 4 + attn + vit)
    assert train_step_flops(s, tokens=10, supervised=4, doc_lengths=[6, 4], images=1) == pytest.approx(3 * f)
    assert mfu(2e12, 2.0, 1e12) == pytest.approx(1.0)
    assert linear_params(ours.mlp1) == 128 * 64 + 64 * 64
    assert decode_weight_bytes(ours) > s.p_head * 4
    with pytest.raises(ValueError):
        forward_flops(s, tokens=-1, supervised=0, doc_lengths=[], images=0)


def test_iu_lengths_and_mix():
    lengths = iu_report_token_lengths()
    assert len(lengths) > 3000 and 30 < sorted(lengths)[len(lengths) // 2] < 120
    mix = sample_mix(2000, lengths, seed=0)
    share = sum(s.task == "vqa" for s in mix) / len(mix)
    assert 0.35 < share < 0.45
    assert all(s.total <= 2048 and s.prompt > 256 for s in mix)
    assert estimate_tokens("The lungs are clear.") == math.ceil(1.25 * 5)


def test_packed_batches_restart_positions_and_mask_boundaries():
    mix = sample_mix(12, [40, 80, 120], seed=3)
    packed = B.packed_batches(mix, 2, 2048, vocab=1009, image_token_id=1008, num_image_token=4, image_size=56)
    assert sum(len(b.doc_lengths) for b in packed) == 12
    b = packed[0]
    pos = b.position_ids[0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) >= 2
    for s in starts:
        assert b.labels[0, s] == -100  # no target across a boundary
    assert b.pixel_values.shape[0] == len(b.doc_lengths)
    assert int((b.input_ids == 1008).sum()) == 4 * len(b.doc_lengths)
    padded = B.padded_batches(mix, 4, vocab=1009, image_token_id=1008, num_image_token=4, image_size=56)
    assert len(padded) == 3 and padded[0].attention_mask.sum() == padded[0].real_tokens
    full = B.padded_batches(mix, 4, vocab=1009, image_token_id=1008, num_image_token=4, image_size=56, pad_to=2048)
    assert full[0].input_ids.shape == (4, 2048) and full[0].real_tokens == padded[0].real_tokens


def test_greedy_settings_and_trim():
    s = greedy_settings({"max_new_tokens": 5, "do_sample": False, "eos_token_id": [7, 2]})
    assert s == {"max_new_tokens": 5, "min_new_tokens": 0, "eos_token_id": [7, 2], "pad_token_id": 7}
    assert greedy_settings({"max_new_tokens": 5, "do_sample": True}) is None
    assert greedy_settings({"max_new_tokens": 5, "num_beams": 2}) is None
    assert greedy_settings({"max_new_tokens": 5, "repetition_penalty": 1.2}) is None
    assert greedy_settings({"do_sample": False}) is None  # no max_new_tokens: let generate decide
    toks = torch.tensor([[5, 7, 0, 0, 0], [5, 6, 2, 0, 0]])
    assert trim_after_eos(toks, [7, 2], 0).tolist() == [[5, 7, 0], [5, 6, 2]]
    assert trim_after_eos(toks, [], 0).shape == toks.shape


@pytest.mark.slow
def test_cli_smoke_on_cpu(tmp_path):
    rc = main(["--device", "cpu", "--preset", "tiny", "--sections", "train,pack,gen", "--batch", "1", "--seq", "330",
               "--steps", "1", "--warmup", "1", "--pack-samples", "8", "--pack-batch", "4", "--row-len", "400", "--new-tokens", "3",
               "--gen-batches", "1", "--static-batches", "", "--plain-batches", "1", "--decode-backend", "none",
               "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert not res.get("errors"), res.get("errors")
    assert {r["case"] for r in res["train"]} == {"ours ckpt=off", "ours ckpt=on", "native ckpt=off", "native ckpt=on"}
    assert res["loss_guard"]["rel_diff"] < 1e-3
    eff = {r["case"].split(",")[0].split(" to ")[0]: r["slot_efficiency"] for r in res["pack"]}
    assert len(res["pack"]) == 4 and eff["packing"] > eff["padding"] and eff["padding"] >= 0.0
    gen = {r["case"] for r in res["gen"]}
    assert any(c.startswith("ours fast") for c in gen) and any(c.startswith("native default") for c in gen)
    # fp32 on CPU: our fast path == our plain generate == native generate with our converted weights
    assert res["native_weights_copied"] is True
    assert {a["vs"]: a["rows_equal"] for a in res["gen_agreement"]} == {"ours plain": 1, "native default": 1}
    assert (tmp_path / "bench_table.txt").read_text().startswith("GPU: cpu")


def test_graph_step_case_runs_the_step_object_on_cpu():
    """The `graphstep` training variant drives `CudaGraphTrainStep` (eager on the CPU): same loss as the plain loop
    of the trainer's fused loss on the same weights and batches, and the step counts land in the row."""
    assert parse_train_variants("graphstep:off") == [("graphstep", (False,))] and "graphstep" in GRAPH_STEP_VARIANTS
    rows = {}
    for graph in (False, True):
        torch.manual_seed(0)
        model = InternVLChatModel(load_preset("tiny"))
        model.img_context_token_id = 1008
        data = [B.fixed_batch(2, 40, vocab=1000, image_token_id=1008, num_image_token=model.num_image_token,
                              image_size=56, answer_from=20, seed=i) for i in range(2)]
        rows[graph] = run_train_case("x", model, lambda m, b: ours_loss(m, b, fast=True, impl="chunked"), data,
                                     shape=shape_of(model), steps=2, warmup=1, ckpt=False, peak_flops=1e12,
                                     graph_step=graph, impl="chunked")
    assert rows[True]["graph_steps"] == {"eager": 5, "captured": 0, "replayed": 0}  # 3 warm-up (eager_steps + 1) + 2
    assert "graph_steps" not in rows[False]
    assert rows[True]["tokens_per_s"] > 0


def test_graph_step_profile_drives_the_step_object(tmp_path):
    torch.manual_seed(0)
    model = InternVLChatModel(load_preset("tiny"))
    model.img_context_token_id = 1008
    data = [B.fixed_batch(2, 40, vocab=1000, image_token_id=1008, num_image_token=model.num_image_token,
                          image_size=56, answer_from=20, seed=i) for i in range(2)]
    p = profile_graph_step_case(model, data, tmp_path / "p.txt", impl="chunked")
    assert p["steps"] == 3 and len(p["per_step"]) == 3 and all(r["wall_ms"] > 0 for r in p["per_step"])
    assert (tmp_path / "p.txt").read_text().startswith("full training step profile")
    assert all(q.grad is None for q in model.parameters())


def test_gen_section_reports_batch1_ttft_against_native_on_cpu(tmp_path):
    """The gen section times TTFT at batch 1 for ours and native default in the same run (ratio) and splits ours
    into vision, prefill and the rest; the table prints it."""
    rc = main(["--device", "cpu", "--preset", "tiny", "--sections", "gen", "--new-tokens", "3", "--gen-batches", "1",
               "--static-batches", "", "--plain-batches", "", "--decode-backend", "none", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert not res.get("errors"), res.get("errors")
    t = res["ttft_b1"]
    assert t["ours_ms"] > 0 and t["native_default_ms"] > 0 and t["vision_ms"] > 0 and t["prefill_ms"] > 0
    assert t["ratio_ours_over_native"] == pytest.approx(t["ours_ms"] / t["native_default_ms"])
    assert t["rest_ms"] == pytest.approx(t["ours_ms"] - t["vision_ms"] - t["prefill_ms"])
    assert "batch 1 TTFT" in (tmp_path / "bench_table.txt").read_text()


def test_a_failed_case_fails_the_command(tmp_path, monkeypatch):
    """A case that raises is recorded in bench.json (the other sections still run) and the command exits 1, so the
    GPU scripts that call the benchmark fail instead of only printing."""
    import lab.bench.cli as cli

    def broken(args, res):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(cli, "section_kernels", broken)
    rc = cli.main(["--device", "cpu", "--preset", "tiny", "--sections", "kernels", "--out", str(tmp_path)])
    errors = json.loads((tmp_path / "bench.json").read_text())["errors"]
    assert rc == 1 and [e["case"] for e in errors] == ["section_kernels"] and "kernel exploded" in errors[0]["error"]
