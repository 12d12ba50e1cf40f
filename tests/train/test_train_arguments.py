"""medrega-train flags: original names parse, contradictions are rejected, and a saved run_config.json re-parses to
the same arguments (so a run can be repeated from its own record)."""
from __future__ import annotations

import json

import pytest

from internvl.train.arguments import parse_args, resolved_config

BASE = ["--meta_path", "m.json", "--output_dir", "out", "--use_cpu", "True"]


def test_original_flags_parse():
    m, d, t = parse_args(["--model_name_or_path", "ckpt", *BASE, "--freeze_llm", "True", "--freeze_mlp", "True",
                          "--freeze_backbone", "True", "--use_llm_lora", "16", "--vision_select_layer", "-1",
                          "--force_image_size", "448", "--down_sample_ratio", "0.5", "--ps_version", "v1",
                          "--conv_style", "Hermes-2", "--max_seq_length", "2048", "--group_by_length", "True",
                          "--grad_checkpoint", "True", "--drop_path_rate", "0.0", "--unfreeze_vit_layers", "-2",
                          "--warmup_ratio", "0.03", "--evaluation_strategy", "no", "--overwrite_output_dir", "True"])
    assert (m.use_llm_lora, m.freeze_llm, m.unfreeze_vit_layers, d.force_image_size, d.group_by_length) == (
        16, True, -2, 448, True)
    assert t.warmup_steps == 0.03 and t.eval_strategy == "no" and t.save_safetensors


@pytest.mark.parametrize("argv,message", [
    (BASE, "exactly one of"),
    (["--preset", "tiny", *BASE], "--tokenizer_path"),
    (["--preset", "tiny", "--tokenizer_path", "t", "--model_name_or_path", "c", *BASE], "exactly one of"),
    (["--preset", "tiny", "--tokenizer_path", "t", "--output_dir", "o", "--use_cpu", "True"], "--meta_path"),
    (["--model_name_or_path", "c", *BASE, "--freeze_llm", "True", "--freeze_mlp", "True", "--freeze_backbone", "True"],
     "nothing would train"),
    (["--model_name_or_path", "c", *BASE, "--use_packed_ds", "True", "--group_by_length", "True"], "exclude"),
    (["--model_name_or_path", "c", *BASE, "--warmup_ratio", "0.1", "--warmup_steps", "5"], "not both"),
])
def test_contradictions_are_rejected(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_run_config_round_trips(tmp_path):
    args = parse_args(["--preset", "tiny", "--tokenizer_path", "tok", *BASE, "--use_llm_lora", "8",
                       "--warmup_ratio", "0.05", "--max_steps", "7", "--data_check", "lenient"])
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(resolved_config(*args, extra={"world_size": 1})))
    again = parse_args([str(path)])
    assert again[0] == args[0] and again[1] == args[1]
    assert again[2].max_steps == 7 and again[2].warmup_steps == 0.05 and again[2].output_dir == "out"


def test_a_run_config_of_the_previous_version_replays(tmp_path):
    """Removed flags at their old defaults (an earlier version's run_config.json lists every flag) are dropped; one
    set to anything else is an error naming the file and the flag, since that run cannot be repeated."""
    args = parse_args(["--preset", "tiny", "--tokenizer_path", "tok", *BASE])
    config = resolved_config(*args, extra={"world_size": 1})
    config["model"].update(fast_kernels=True, lm_loss_impl="auto", model_dtype="auto")
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(config))
    assert parse_args([str(path)])[0] == args[0]
    config["model"]["model_dtype"] = "bfloat16"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"run_config\.json: sets flags this version removed \(--model_dtype"):
        parse_args([str(path)])


def test_yaml_config_flat_or_grouped_like_run_config(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("model_name_or_path: ckpt\nmeta_path: m.json\noutput_dir: out\nuse_cpu: true\nuse_llm_lora: 8\n")
    grouped = tmp_path / "grouped.yaml"
    grouped.write_text("model: {model_name_or_path: ckpt, use_llm_lora: 8}\ndata: {meta_path: m.json}\n"
                       "training: {output_dir: out, use_cpu: true}\n")
    assert parse_args([str(flat)])[:2] == parse_args([str(grouped)])[:2]
    assert parse_args([str(grouped)])[0].use_llm_lora == 8
