"""QLoRA on the tiny preset, on the CPU: `--load_in_4bit` loads the LLM linears as bitsandbytes NF4 (its CPU backend
runs here), trains LoRA adapters on them through `medrega-train`, and the merge folds the adapters into the
dequantised base so that the merged fp32 checkpoint computes what the trained 4-bit model computes."""
from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.model import InternVLChatModel
from internvl.tokenization import load_tokenizer
from internvl.train import qlora
from internvl.train.arguments import DataTrainingArguments, ModelArguments, parse_args
from internvl.train.build import build_model_and_tokenizer
from internvl.train.cli import main as train_main
from internvl.train.lora import merge_lora_run

from internvl.testing.square_task import write_square_dataset


def _build(tmp_path: Path, tokenizer_dir: Path):
    model_args = ModelArguments(preset="tiny", tokenizer_path=str(tokenizer_dir), use_llm_lora=4, load_in_4bit=True,
                                grad_checkpoint=True)
    return build_model_and_tokenizer(model_args, DataTrainingArguments(meta_path="unused.json"),
                                     base_save_dir=tmp_path / "base", device="cpu")


def test_4bit_build_quantises_only_the_llm_linears(tmp_path, tiny_tokenizer_dir):
    assert qlora.four_bit_unavailable("cpu") is None  # bitsandbytes' CPU backend runs NF4 here: the real path
    model = _build(tmp_path, tiny_tokenizer_dir).model
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    llm_linears = {n for n, m in model.language_model.named_modules() if isinstance(m, torch.nn.Linear)
                   and "lora_" not in n and not n.endswith("lm_head") and not isinstance(m, PeftModel)}
    assert four_bit and all(n.startswith("language_model.") and "lm_head" not in n for n in four_bit)
    assert len(four_bit) == len([n for n in llm_linears if n.endswith("base_layer")])
    assert all(m.weight.quant_type == "nf4" for n, m in model.named_modules() if n in four_bit)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in (*model.vision_model.modules(), *model.mlp1.modules()))
    assert isinstance(model.language_model, PeftModel) and model.qlora_spec["quant_type"] == "nf4"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not model.is_quantized  # the Trainer's "purely quantised" guard: adapters sit on the 4-bit LLM


def test_4bit_skipped_with_the_reason_where_bitsandbytes_cannot_run(tmp_path, tiny_tokenizer_dir, monkeypatch,
                                                                     capsys):
    monkeypatch.setattr(qlora, "four_bit_unavailable", lambda device, dtype=None: "no 4-bit backend for this device")
    model = _build(tmp_path, tiny_tokenizer_dir).model
    err = capsys.readouterr().err
    assert "--load_in_4bit: 4-bit quantisation skipped on cpu: no 4-bit backend for this device" in err
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert isinstance(model.language_model, PeftModel) and getattr(model, "qlora_spec", None) is None


@pytest.mark.parametrize("flags, message", [
    (["--load_in_4bit", "True"], "needs --use_llm_lora"),
    (["--load_in_4bit", "True", "--use_llm_lora", "4", "--freeze_llm", "False"], "keeps the LLM frozen"),
    (["--load_in_4bit", "True", "--use_llm_lora", "4", "--deepspeed", "src/shell/zero_stage3_config.json"],
     "without DeepSpeed"),
])
def test_4bit_flag_combinations_refused(tmp_path, flags, message):
    base = ["--preset", "tiny", "--tokenizer_path", "tok", "--meta_path", "m.json", "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=message):
        parse_args(base + flags)


def _inputs(model, tokenizer):
    ctx = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    text = tokenizer("<|im_start|>user\nwhere is the square?<|im_end|>", add_special_tokens=False)["input_ids"]
    pixel_values = torch.randn(1, 3, model.config.image_size, model.config.image_size,
                               generator=torch.Generator().manual_seed(0))
    return {"input_ids": torch.tensor([[ctx] * model.num_image_token + text]), "pixel_values": pixel_values,
            "image_flags": torch.ones(1, dtype=torch.long)}


def _logits(model, tokenizer) -> torch.Tensor:
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    with torch.no_grad():
        return model.eval()(**_inputs(model, tokenizer)).logits.float()


def test_qlora_trains_through_medrega_train_and_merges(tmp_path, tiny_tokenizer_dir):
    meta = write_square_dataset(tmp_path / "squares", n=8, seed=0)
    out = tmp_path / "run"
    steps = 8
    args = ["--preset", "tiny", "--tokenizer_path", str(tiny_tokenizer_dir), "--meta_path", str(meta),
            "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size", "2",
            "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--save_strategy", "no",
            "--logging_steps", "1", "--use_cpu", "True", "--seed", "3", "--disable_tqdm", "True",
            "--max_seq_length", "512", "--report_to", "none", "--lora_dropout", "0.0",
            "--use_llm_lora", "4", "--load_in_4bit", "True", "--grad_checkpoint", "True"]
    assert train_main(args) == 0
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == steps and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # the adapters learn on the 4-bit base
    info = json.loads((out / "lora_run.json").read_text())
    assert info["base_quantization"]["quant_type"] == "nf4" and info["base_quantization"]["double_quant"]
    assert "quantization_config" not in json.loads((out / "base_model" / "config.json").read_text())

    # what training computed: the saved base loaded in 4 bit, as the run did, plus the trained adapters
    tokenizer = load_tokenizer(out)
    spec = info["base_quantization"]
    trained = InternVLChatModel.from_pretrained(str(out / "base_model"), dtype=torch.float32,
                                                quantization_config=qlora.qlora_config(spec), device_map={"": "cpu"})
    trained.language_model = PeftModel.from_pretrained(trained.language_model, str(out / "adapters/language_model"))
    for module in trained.modules():  # eval-mode CPU inference repacks 4-bit weights for a bf16 kernel; training
        if isinstance(module, bnb.nn.Linear4bit):  # ran the fp32 dequantise + matmul path: compare with that
            module.support_avx512bf16_for_cpu = False
    expected = _logits(trained, tokenizer)

    merged_dir = merge_lora_run(out, tmp_path / "merged")
    merged = InternVLChatModel.from_pretrained(str(merged_dir), dtype=torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert (_logits(merged, tokenizer) - expected).abs().max() <= 1e-4
    # merging into the raw (never quantised) base instead would not reproduce the trained model
    raw = InternVLChatModel.from_pretrained(str(out / "base_model"), dtype=torch.float32)
    raw.language_model = PeftModel.from_pretrained(raw.language_model, str(out / "adapters/language_model"))
    assert (_logits(raw, tokenizer) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("recipe", ["medrega_stage2.sh:qlora", "medrega_stage2_qlora.sh"])
def test_qlora_recipe_flags(tmp_path, recipe):
    from .test_train_shell_recipes import _run_recipe

    (call,) = _run_recipe(tmp_path, recipe, {"GPUS_PER_NODE": "1"})
    assert call[0] == "torchrun" and "--nproc-per-node=1" in call
    argv = call[call.index("internvl.train") + 1:]
    assert "--deepspeed" not in argv and argv[argv.index("--bf16") + 1] == "True"
    argv = argv[:argv.index("--bf16")] + argv[argv.index("--bf16") + 2:]  # bf16 needs a GPU to validate
    model_args, data_args, training_args = parse_args(argv + ["--use_cpu", "True"])
    assert model_args.load_in_4bit and model_args.bnb_4bit_quant_type == "nf4" and model_args.use_bnb_nested_quant
    assert model_args.use_llm_lora == 16 and model_args.freeze_llm and model_args.freeze_backbone
    assert model_args.freeze_mlp and model_args.grad_checkpoint and data_args.max_seq_length == 2048
    assert training_args.gradient_accumulation_steps == 4  # global 16 / (4 per GPU x 1 GPU)
    assert training_args.learning_rate == 1e-5 and training_args.max_steps == 3
