"""The benchmark's recipe section (lab/bench/recipe.py): the MFU formula for frozen towers and LoRA on hand-worked
numbers, the LoRA adapter count against PEFT's, and the recipe cases on the tiny preset on the CPU, where the
shipped ZeRO-3 config (torch AdamW, DeepSpeed's CPU accelerator, gloo) must give the per-step losses of the path
without DeepSpeed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from internvl.model import InternVLChatModel, load_preset
from internvl.train.lora import wrap_llm_lora
from lab.bench.flops import ModelShape, lora_params, recipe_step_flops, train_step_flops
from lab.bench.recipe import engine_config, recipe_cases, recipe_config

ROOT = Path(__file__).resolve().parents[2]
#: fp32 on the CPU: ZeRO-3 only re-orders the same fp32 sums (flat partitions, bucketed reductions); measured
#: agreement is about 1e-7 relative, so 1e-5 fails on any real difference in the step (bf16 target: 1e-3).
LOSS_RTOL_FP32 = 1e-5

# ViT-side counts chosen so every term is distinct; worked out by hand in the test below.
SHAPE = ModelShape(p_llm=100, p_head=10, d_attn=4, l_llm=2, p_vit=50, c_vit=3, l_vit=1, n_vit=5, p_patch=6,
                   p_mlp1=7, n_img_tok=2)


def test_recipe_flops_by_hand():
    # tokens 8, supervised 3, documents of 5 and 3 tokens, one image:
    #   LLM linears fwd 2*100*8 = 1600; head fwd 2*10*3 = 60; attention fwd 4*4*2*(15+6) = 672
    #   ViT + projector fwd 2*50*5 + 4*3*1*25 + 2*6*4 + 2*7*2 = 500 + 300 + 48 + 28 = 876 (forward only: frozen)
    kw = dict(tokens=8, supervised=3, doc_lengths=[5, 3], images=1)
    # full LLM: 876 + 3*(1600 + 60 + 672) = 7872
    assert recipe_step_flops(SHAPE, **kw) == 7872
    # LoRA with 20 adapter weights: 876 + 2*(1600 + 60) + 3*672 + 6*20*8 = 876 + 3320 + 2016 + 960 = 7172
    assert recipe_step_flops(SHAPE, lora=20, **kw) == 7172
    # the all-trainable formula charges the ViT 3x: the recipe's is exactly 2 x 876 less
    assert train_step_flops(SHAPE, **kw) - recipe_step_flops(SHAPE, **kw) == 2 * 876
    with pytest.raises(ValueError):
        recipe_step_flops(SHAPE, lora=-1, **kw)


def test_lora_params_match_peft_and_hand_count():
    config = load_preset("tiny")
    model = InternVLChatModel(config)
    wrap_llm_lora(model, 4, dropout=0.0)
    peft_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert lora_params(config, 4) == peft_count > 0
    assert lora_params(config, 0) == 0


def test_lora_params_hand_worked():
    # hidden 8, heads 2 (head_dim 4), 1 KV head, MLP 16, 1 layer, r 2:
    # q 8+8, k 8+4, v 8+4, o 8+8, gate 8+16, up 8+16, down 16+8 = 128 -> x r = 256
    c = type("C", (), dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16,
                           num_hidden_layers=1, head_dim=4))()
    assert lora_params(c, 2) == 256


def test_yi_shape_and_cases():
    c = recipe_config("yi").llm_config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, c.vocab_size,
            c.num_hidden_layers) == (7168, 56, 8, 20480, 64000, 4)
    with torch.device("meta"):
        llm = sum(p.numel() for p in InternVLChatModel(recipe_config("yi", 2)).language_model.parameters())
    # 2 layers of (2*7168*7168 + 2*7168*1024 + 3*7168*20480) + embedding and head 2*64000*7168
    assert llm == 2 * (2 * 7168**2 + 2 * 7168 * 1024 + 3 * 7168 * 20480 + 2 * 7168) + 2 * 64000 * 7168 + 7168
    cases = recipe_cases(["tiny"], ["zero3", "plain"], [0, 16])
    assert [c.name for c in cases] == ["tiny full plain", "tiny full zero3", "tiny lora r16 plain",
                                       "tiny lora r16 zero3"]


def test_engine_configs_are_shipped_plus_torch_adam(tmp_path):
    shipped = json.loads((ROOT / "src/shell/zero_stage3_config.json").read_text())
    got = json.loads(engine_config("zero3", tmp_path).read_text())
    assert got.pop("optimizer")["params"].pop("torch_adam") is True
    deepcompile = json.loads(engine_config("zero3_deepcompile", tmp_path).read_text())
    assert deepcompile.pop("compile") == {"deepcompile": True}
    deepcompile.pop("optimizer")
    shipped.pop("optimizer")
    assert got == shipped == deepcompile
    fsdp2 = json.loads((ROOT / "src/shell/fsdp2_config.json").read_text())
    # both FSDP2 engines train with the shipped file: the towers' placement is medrega-train's --fsdp_frozen_towers
    assert json.loads(engine_config("fsdp2", tmp_path).read_text()) == fsdp2
    assert json.loads(engine_config("fsdp2_towers_sharded", tmp_path).read_text()) == fsdp2
    assert engine_config("plain", tmp_path) is None
    with pytest.raises(ValueError, match="unknown recipe engine"):
        recipe_cases(["tiny"], ["zero4"], [0])


def _env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GLOO_SOCKET_IFNAME="lo")
    return e


def test_recipe_cases_on_cpu_zero3_losses_equal_plain(tmp_path):
    """The benchmark command itself (no launcher: it sets up its own single-rank group) on the tiny preset; fp32
    on the CPU, the same batch every step and a learning rate high enough that the losses fall (full LLM 6.93 ->
    6.40, LoRA 6.93 -> 6.88 in 3 steps), so a ZeRO-3 step that updated nothing or the wrong weights would show."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "lab.bench", "--device", "cpu", "--preset", "tiny", "--sections", "recipe",
           "--recipe-models", "tiny", "--recipe-engines", "plain,zero3", "--recipe-lora", "0,16",
           "--recipe-seq", "256", "--recipe-steps", "2", "--recipe-warmup", "2", "--recipe-lr", "3e-3",
           "--recipe-distinct-batches", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads((out / "bench.json").read_text())["recipe"]}
    assert set(rows) == {"tiny full plain", "tiny full zero3", "tiny lora r16 plain", "tiny lora r16 zero3"}
    for setting in ("full", "lora r16"):
        plain, zero3 = rows[f"tiny {setting} plain"], rows[f"tiny {setting} zero3"]
        assert "error" not in plain and "error" not in zero3, (plain, zero3)
        assert len(plain["losses"]) == 4
        assert zero3["losses"] == pytest.approx(plain["losses"], rel=LOSS_RTOL_FP32), (setting, zero3, plain)
        assert plain["losses"][-1] < plain["losses"][0] - 0.02  # the steps train: the losses fall
        assert zero3["vs_plain"] == pytest.approx(zero3["tokens_per_s"] / plain["tokens_per_s"])
        assert zero3["loss_rel_vs_plain"] <= LOSS_RTOL_FP32
        assert plain["mfu"] > 0 and plain["tokens_per_s"] > 0
    assert rows["tiny lora r16 plain"]["trainable"] < rows["tiny full plain"]["trainable"]
    assert "tiny full zero3" in run.stdout and "vs plain" in run.stdout  # the printed table


#: bf16 (the recipe's precision): ZeRO-3 and FSDP2 hold bf16 weights where `plain` keeps fp32 weights under autocast;
#: the issue's target is 1e-3 relative per step (measured on the CPU: ZeRO-3 8e-6, FSDP2 2e-4 full / 8e-6 LoRA; the
#: first step's gradient norm, before the weights differ by an update, 1e-5 and 3e-4).
LOSS_RTOL_BF16 = 1e-3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recipe_new_engines_on_cpu_losses_equal_plain(tmp_path, precision):
    """ZeRO-3 with leaf-module layers (zero3_tuned), FSDP2 and (fp32) ZeRO-3 under the Trainer's torch_compile
    (accelerate calls the DeepSpeed engine's compile(); backend "eager" here: dynamo's capture with ZeRO-3's hooks, no
    C++ build) train the tiny preset with the losses of the path without DeepSpeed, full LLM and LoRA, in fp32
    (1e-5) and in bf16 (1e-3, the issue's target). A failing engine is a row with an error, which fails this test.
    DeepCompile needs its CUDA extension: GPU only.

    FSDP2 is really applied (accelerate drops FSDP on the CPU; MedRegTrainer installs its plugin, `compat.fsdp_on_cpu`): with the
    product default (`fsdp2`: frozen towers replicated) 5 FSDP2 units (2 LLM layers, the embedding, the [final norm,
    LM head] tail, the root) and the towers' 36 tensors plain, in bf16 under bf16; with `fsdp2_towers_sharded` 7 units
    (the 2 ViT layers too) and every tensor a DTensor shard. The trainer's fused LM-head loss reads the sharded
    `FSDPLinear` head (before the fix it fell back to the full-logits path)."""
    out = tmp_path / "bench"
    bf16 = precision == "bf16"
    engines = (["zero3_tuned", "fsdp2", "fsdp2_towers_sharded"] if bf16
               else ["zero3_tuned", "fsdp2", "zero3_compile"])
    tol = LOSS_RTOL_BF16 if bf16 else LOSS_RTOL_FP32
    cmd = [sys.executable, "-m", "lab.bench", "--device", "cpu", "--preset", "tiny", "--sections", "recipe",
           "--recipe-models", "tiny", "--recipe-engines", ",".join(["plain"] + engines), "--recipe-lora", "0,16",
           "--recipe-seq", "256", "--recipe-steps", "2", "--recipe-warmup", "2", "--recipe-lr", "3e-3",
           "--recipe-distinct-batches", "1", "--recipe-compile-backend", "eager", "--out", str(out),
           "--recipe-bf16", "on" if bf16 else "off"]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads((out / "bench.json").read_text())["recipe"]}
    for setting in ("full", "lora r16"):
        plain = rows[f"tiny {setting} plain"]
        assert "error" not in plain and plain["losses"][-1] < plain["losses"][0] - 0.02
        for engine in engines:
            row = rows[f"tiny {setting} {engine}"]
            assert "error" not in row, row
            assert row["losses"] == pytest.approx(plain["losses"], rel=tol), (setting, engine, row, plain)
            assert row["loss_rel_vs_plain"] <= tol and row["trainable"] == plain["trainable"]
            # the first step's gradient norm (same weights; later steps see bf16 vs fp32 weights after an update)
            assert row["grad_norms"][0] == pytest.approx(plain["grad_norms"][0], rel=tol), (setting, engine, row)
            assert row["fused_head"] is True, (setting, engine, row)
            # FSDP2 units: tiny's 2 LLM layers, embedding, [norm, head] tail, root; + the 2 ViT layers when the frozen
            # towers are sharded (by default they are kept out: their 36 tensors are plain, not DTensor shards)
            units = {"fsdp2": 5, "fsdp2_towers_sharded": 7}.get(engine, 0)
            assert row["fsdp_units"] == units, (setting, engine, row)
            if engine == "fsdp2":
                assert row["sharded_tensors"] == row["tensors"] - 36, (setting, row)
                assert row["tower_dtypes"] == ["torch.bfloat16" if bf16 else "torch.float32"], (setting, row)
            if engine == "fsdp2_towers_sharded":
                assert row["sharded_tensors"] == row["tensors"] and row["tower_dtypes"] == ["torch.float32"], row
        # the tuned config's leaf modules reached DeepSpeed: tiny's 2 ViT + 2 LLM layers are gathered whole
        assert rows[f"tiny {setting} zero3_tuned"]["z3_leaf_layers"] == 4


def test_recipe_profile_writes_the_first_timed_steps_top_kernels(tmp_path):
    """`profile=True` leaves one table per case with the profiled step's operators (the CPU run profiles CPU time)."""
    from lab.bench.recipe import RecipeCase, recipe_config, run_recipe_case

    out = tmp_path / "runs"
    out.mkdir()
    row = run_recipe_case(RecipeCase("tiny", "plain"), recipe_config("tiny", None), batch=1, seq=128, steps=1,
                          warmup=1, out=out, bf16=False, profile=True)
    assert "error" not in row and row["tokens_per_s"] > 0
    table = (out / "profile_tiny_full_plain.txt").read_text()
    assert "aten::mm" in table or "aten::addmm" in table or "aten::linear" in table, table[:2000]
