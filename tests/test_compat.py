"""`internvl.compat`: the one module that touches private transformers / DeepSpeed internals. Checks that its version
check and its missing-internal errors name the version, that its accessors work on the installed transformers, and
that no other file of the package uses such an internal."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config
from transformers.models.llama import modeling_llama

import internvl
from internvl import compat

PACKAGE = Path(internvl.__file__).parent
#: the compat module itself
EXEMPT = ("compat.py",)
#: private names a subclass is meant to override (transformers' documented hook for custom models' weight init)
DOCUMENTED_HOOKS = {"_init_weights"}
PRIVATE_USES = [
    (re.compile(r"super\(\)\.(_[a-z]\w*)"), "a private method of a transformers base class"),
    (re.compile(r"def (_(?:get_train_sampler|get_num_items_in_batch|inner_training_loop|get_output_dir|"
                r"save_checkpoint|save|load_from_checkpoint))\("), "an override of a private Trainer step"),
    (re.compile(r"(_hf_deepspeed_config_weak_ref)"), "transformers' private DeepSpeed config reference"),
    (re.compile(r"\.(_attn_implementation)\b"), "a config's private attention implementation"),
    (re.compile(r"(ALL_MASK_ATTENTION_FUNCTIONS)"), "transformers' mask table (use AttentionMaskInterface)"),
    (re.compile(r"(\.forward = )"), "a per-instance forward swap (use compat.swap_forward)"),
    (re.compile(r"from (?:transformers|deepspeed|peft)[\w.]* import .*\b(_\w+)"), "a private import"),
]


def test_no_private_internal_outside_compat():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(EXEMPT):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for pattern, what in PRIVATE_USES:
                match = pattern.search(line)
                if match and match.group(1) not in DOCUMENTED_HOOKS:
                    found.append(f"{rel}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_version_check_names_the_version_and_the_range():
    assert compat.check_version("transformers") == compat.installed_version("transformers")
    with pytest.raises(compat.CompatError, match=r"transformers 6\.0\.0 is not supported.*>=5\.17,<6"):
        compat.check_version("transformers", "6.0.0")
    with pytest.raises(compat.CompatError, match=r"transformers 5\.3 is not supported"):
        compat.check_version("transformers", "5.3")


def test_missing_trainer_step_is_a_clear_error():
    compat.check_trainer_steps(Trainer)  # the installed transformers has every step

    class Renamed(Trainer):
        pass

    Renamed._save_checkpoint = lambda self, model, checkpoint_folder: None
    version = compat.installed_version("transformers")
    with pytest.raises(compat.CompatError, match=rf"transformers {re.escape(version)} has no "
                                                 r"`Trainer._save_checkpoint\(model, trial\)`"):
        compat.check_trainer_steps(Renamed)


def test_trainer_hooks_reach_the_private_steps(tmp_path):
    """A private step calls its public-named hook with the Trainer's own step as `default`."""
    seen = []

    class Spy(compat.trainer_base()):
        def step_grad_norm(self, model, grad_norm, default):
            seen.append(default(model, grad_norm))
            return 7.0

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    trainer = Spy(model=model, args=TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none"))
    assert trainer._get_grad_norm(model, torch.tensor(3.0)) == 7.0
    assert len(seen) == 1 and float(seen[0]) == 3.0
    assert trainer.run_dir(None) == str(tmp_path / "run") == trainer._get_output_dir(None)  # hook's default
    with pytest.raises(compat.CompatError, match=r"_get_grad_norm` as called with \['extra'\]"):
        trainer._get_grad_norm(model, torch.tensor(3.0), extra=1)  # a newer Trainer's argument is never dropped


def test_attention_accessors():
    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    compat.set_attn_implementation(config, "eager")
    attention = LlamaForCausalLM(config).model.layers[0].self_attn
    assert compat.attn_implementation(attention.config) == "eager"
    assert compat.attention_function(attention) is modeling_llama.eager_attention_forward
    compat.set_attn_implementation(attention.config, "sdpa")
    assert compat.attention_function(attention) is not modeling_llama.eager_attention_forward
    with pytest.raises(compat.CompatError, match="has no `PreTrainedConfig._attn_implementation`"):
        compat.attn_implementation(object())


def test_active_deepspeed_config_round_trip():
    unset_hf_deepspeed_config()
    assert compat.active_hf_deepspeed_config() is None
    held = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_batch_size": 1})
    try:
        assert compat.active_hf_deepspeed_config() is held
    finally:
        unset_hf_deepspeed_config()


def test_swap_and_restore_forward():
    layer = torch.nn.Linear(2, 2)
    compat.swap_forward(layer, lambda self, x: x * 0, "_swapped")
    assert layer._swapped and torch.equal(layer(torch.ones(1, 2)), torch.zeros(1, 2))
    assert compat.restore_forwards(layer, "_swapped") == 1
    assert not layer._swapped and "forward" not in vars(layer)


def test_transformers_at_least():
    installed = compat.installed_version("transformers")
    assert compat.transformers_at_least(installed)
    assert compat.transformers_at_least("5.0")
    assert not compat.transformers_at_least("99.0")


def test_plain_cuda_arch_list(monkeypatch):
    """DeepSpeed's op builder cannot parse "9.0a": the suffix goes, everything else stays; no variable, no change."""
    from internvl.compat import plain_cuda_arch_list

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a 10.0f+PTX")
    assert plain_cuda_arch_list() == "8.0;9.0 10.0+PTX" and os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0 10.0+PTX"
    assert plain_cuda_arch_list() is None
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert plain_cuda_arch_list() is None and "TORCH_CUDA_ARCH_LIST" not in os.environ
