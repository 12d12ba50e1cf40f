"""Command-line arguments of `medrega-train`: three dataclasses parsed by `transformers.HfArgumentParser`.

Flag names follow the original InternVL/MedRegA fine-tuning script (`internvl_chat_finetune.py`) wherever it has the
flag, so the released shell recipes translate one to one; new options are additions, never renames.
`ModelArguments` (weights, freezing, LoRA, vision overrides, fast paths), `DataTrainingArguments` (meta file,
template, lengths, tiling, packing, data checks), `MedRegTrainingArguments` (`TrainingArguments` with our defaults).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments


def _arg(default: Any, help: str) -> Any:
    """A flag's dataclass field: its default and its `--help` text."""
    return field(default=default, metadata={"help": help})


def _freeze_flag(what: str) -> Any:
    """A `--freeze_*` flag: unset (None) until `resolve_freeze_defaults` gives it its LoRA-dependent default."""
    return _arg(None, f"Freeze {what} (requires_grad False). Default: True when LoRA is on, else False.")


@dataclass
class ModelArguments:
    """Where the model comes from and which parts of it train."""

    model_name_or_path: str | None = _arg(None, "Local InternVL-Chat checkpoint directory (original layout, "
                                                "safetensors). Or --preset.")
    preset: str | None = _arg(None, "Random-init bundled preset (tiny, mid, medrega, internvl-chat-v1-2); needs "
                                    "--tokenizer_path.")
    tokenizer_path: str | None = _arg(None, "Local tokenizer directory. Defaults to --model_name_or_path.")
    freeze_llm: bool | None = _freeze_flag("the language model")
    freeze_backbone: bool | None = _freeze_flag("the vision encoder (InternViT)")
    freeze_mlp: bool | None = _freeze_flag("the projector `mlp1`")
    unfreeze_vit_layers: int = _arg(0, "After freezing the backbone, re-enable encoder.layers[k:] (negative k = last "
                                       "|k| layers; 0 = none).")
    unfreeze_lm_head: bool = _arg(False, "Keep the LM head trainable under freeze_llm.")
    use_backbone_lora: int = _arg(0, "LoRA rank on the ViT (alpha = 2 * rank); 0 = off.")
    use_llm_lora: int = _arg(0, "LoRA rank on the LLM (alpha = 2 * rank); 0 = off.")
    lora_dropout: float = _arg(0.05, "Dropout on the LoRA branch (original: 0.05).")
    vision_select_layer: int = _arg(-1, "ViT layer whose output feeds the projector.")
    drop_path_rate: float = _arg(0.0, "Stochastic depth of the ViT (linear over depth).")
    ps_version: Literal["v1", "v2"] = _arg("v1", "Pixel-shuffle token order; V1.2/MedRegA checkpoints need v1.")
    grad_checkpoint: bool = _arg(True, "Gradient checkpointing in the LLM (and ViT).")
    attn_implementation: str = _arg("sdpa", "LLM attention: sdpa | eager | flash_attention_2 (if installed).")
    fused_lm_loss: bool = _arg(True, "LM head + cross-entropy on supervised positions only, in chunks, instead of "
                                     "[batch, seq, vocab] logits (plain loss when the head is LoRA-wrapped).")
    compile_layers: bool = _arg(True, "CUDA: torch.compile each LLM decoder layer and ViT block (not under ZeRO-3 or "
                                      "in LoRA-wrapped towers).")
    fuse_projections: bool = _arg(True, "CUDA, compiled layers: q/k/v and gate/up as one matmul each (same "
                                        "parameters).")
    grad_checkpoint_skip_llm_layers: int = _arg(0, "Leave the last N LLM layers un-checkpointed (more "
                                                   "activation memory; N=2 measured slower with compiled layers, "
                                                   "docs/performance.md).")
    load_in_4bit: bool = _arg(False, "QLoRA: the LLM's linear layers in 4 bit (bitsandbytes); needs --use_llm_lora, "
                                     "one process per GPU, no DeepSpeed.")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _arg("nf4", "4-bit data type with --load_in_4bit.")
    use_bnb_nested_quant: bool = _arg(True, "With --load_in_4bit: quantise the block scales too (double "
                                            "quantisation).")


@dataclass
class DataTrainingArguments:
    """What the model is trained on and how samples become tensors."""

    meta_path: str | None = _arg(None, "meta_file.json: dataset name -> {root, annotation, repeat_time, ...}.")
    conv_style: str = _arg("Hermes-2", "Chat template name (internvl/templates).")
    max_seq_length: int = _arg(2048, "Samples are truncated to this many tokens.")
    force_image_size: int | None = _arg(None, "Tile size in pixels (448 for V1.2); the ViT position grid is "
                                              "resized once if the checkpoint differs.")
    down_sample_ratio: float = _arg(0.5, "Pixel-shuffle ratio (0.5 -> 4x fewer tokens).")
    pad2square: bool = _arg(False, "Pad images to a square before resizing.")
    dynamic_image_size: bool = _arg(False, "Dynamic tiling (off for V1.2/MedRegA).")
    use_thumbnail: bool = _arg(False, "Add a thumbnail tile with dynamic tiling.")
    min_dynamic_patch: int = _arg(1, "Minimum tiles with dynamic tiling.")
    max_dynamic_patch: int = _arg(1, "Maximum tiles with dynamic tiling.")
    group_by_length: bool = _arg(False, "Length-grouped sampling (megabatches of similar length).")
    data_check: Literal["strict", "lenient"] = _arg("strict", "strict: a bad record aborts (FILE:LINE: reason); "
                                                              "lenient: bad records are reported, counted, left out.")
    use_packed_ds: bool = _arg(False, "Pack a micro-batch's samples into rows of max_packed_tokens (attention per "
                                      "sample).")
    max_packed_tokens: int = _arg(8192, "Tokens per packed row.")
    num_images_expected: int = _arg(12, "Max image tiles per packed row.")
    loss_reduction: Literal["token", "sample", "square"] = _arg(
        "token", "Per-token loss weight under packing: token (1), sample (1/n), square (1/sqrt n).")


@dataclass
class MedRegTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with our defaults, the original script's flag names and the divergence guard.
    `--resume_from_checkpoint auto` resumes from the newest checkpoint of `output_dir` that verifies."""

    remove_unused_columns: bool = _arg(False, "Keep every collated key (pixel_values...).")
    report_to: str | None = _arg("tensorboard", "tensorboard | wandb | all | none.")
    overwrite_output_dir: bool = _arg(False, "Allow a fresh run in an output_dir that already holds checkpoints.")
    save_safetensors: bool = _arg(True, "Always safetensors.")
    logging_steps: float = _arg(1, "Log every N optimizer steps.")
    warmup_ratio: float = _arg(0.0, "Original flag: fraction of the steps spent warming up (= --warmup_steps < 1).")
    evaluation_strategy: str | None = _arg(None, "Original flag name of --eval_strategy (no | steps | epoch).")
    on_nonfinite: Literal["stop", "skip"] = _arg("stop", "Non-finite loss or gradient norm: stop naming the step and "
                                                         "records, or skip the step, counted (not with DeepSpeed).")
    max_nonfinite_steps: int = _arg(10, "With --on_nonfinite skip: stop after this many skipped steps.")
    fsdp_frozen_towers: Literal["replicated", "sharded"] = _arg(
        "replicated", "With --fsdp: frozen ViT and projector whole on every GPU, out of FSDP (bf16 under --bf16), or "
                      "sharded like the LLM (internvl/train/fsdp.py).")
    logging_nan_inf_filter: bool = _arg(False, "transformers' NaN/inf loss filter (a host sync per micro-batch); off: "
                                               "the divergence guard handles them.")

    def __post_init__(self) -> None:
        if self.on_nonfinite == "skip" and self.deepspeed:
            raise ValueError("--on_nonfinite skip is not available with DeepSpeed (its engine steps inside backward, "
                             "before the check); use --on_nonfinite stop")
        if self.warmup_ratio:
            if not 0 <= self.warmup_ratio < 1:
                raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
            if self.warmup_steps and self.warmup_steps != self.warmup_ratio:  # equal: a saved run_config.json
                raise ValueError("give --warmup_ratio or --warmup_steps, not both")
            self.warmup_steps = self.warmup_ratio
        if self.evaluation_strategy is not None:
            self.eval_strategy = self.evaluation_strategy
        super().__post_init__()


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, MedRegTrainingArguments)


#: flags a `run_config.json` of an earlier version may hold: their old default, and what became of them.
REMOVED_FLAGS: dict[str, tuple[Any, str]] = {
    "fast_kernels": (True, "the liger kernels moved to the performance lab (lab/fast_kernels.py)"),
    "lm_loss_impl": ("auto", "the trainer always runs the measured 'auto' loss kernel"),
    "model_dtype": ("auto", "weights are bf16 with --bf16 under DeepSpeed/QLoRA, else fp32"),
}


def _drop_removed_flags(flat: dict[str, Any], source: str) -> dict[str, Any]:
    """`flat` without the removed flags that hold their old default (so an earlier run's config replays);
    `ValueError` naming the file for one set to anything else, since the run it records cannot be repeated."""
    changed = {k: flat[k] for k, (default, _) in REMOVED_FLAGS.items() if k in flat and flat[k] != default}
    if changed:
        why = "; ".join(f"--{k} {v!r}: {REMOVED_FLAGS[k][1]}" for k, v in changed.items())
        raise ValueError(f"{source}: sets flags this version removed ({why}); remove them to run without")
    return {k: v for k, v in flat.items() if k not in REMOVED_FLAGS}


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, MedRegTrainingArguments]:
    """Parse `argv` (default: sys.argv[1:]) into the three argument groups and check them together.

    A single `.json`/`.yaml` argument is read as a config file holding all flags, flat or grouped like the resolved
    `run_config.json` of an earlier run. Raises `ValueError` with a readable message on inconsistent flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        text = Path(argv[0]).read_text(encoding="utf-8")
        raw = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        flat = {**raw.get("model", {}), **raw.get("data", {}), **raw.get("training", {})} if "model" in raw else raw
        model_args, data_args, training_args = parser.parse_dict(_drop_removed_flags(flat, argv[0]),
                                                                 allow_extra_keys=False)
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    validate_args(model_args, data_args, training_args)
    return model_args, data_args, training_args


FREEZE_FLAGS = ("freeze_llm", "freeze_backbone", "freeze_mlp")


def resolve_freeze_defaults(model_args: ModelArguments) -> ModelArguments:
    """Give every freeze flag left unset (None) its default, in place; returns `model_args`. With LoRA on, a tower
    whose flag was not given is frozen, so only the adapters train (as in the original LoRA recipes); without LoRA
    nothing is frozen unless asked (the original trainer's defaults)."""
    lora = bool(model_args.use_llm_lora or model_args.use_backbone_lora)
    for name in FREEZE_FLAGS:
        if getattr(model_args, name) is None:
            setattr(model_args, name, lora)
    return model_args


def validate_args(model_args: ModelArguments, data_args: DataTrainingArguments,
                  training_args: TrainingArguments) -> None:
    """Resolve the freeze defaults and reject contradictory or out-of-range flags early, before any weights load."""
    resolve_freeze_defaults(model_args)
    if (model_args.model_name_or_path is None) == (model_args.preset is None):
        raise ValueError("give exactly one of --model_name_or_path (a checkpoint dir) or --preset (random init)")
    if model_args.preset is not None and model_args.tokenizer_path is None:
        raise ValueError("--preset needs --tokenizer_path (a local tokenizer directory)")
    if data_args.meta_path is None:
        raise ValueError("--meta_path is required (a meta_file.json; see src/shell/meta_file.json)")
    _check_ranges({"model": model_args, "data": data_args, "training": training_args})
    _check_4bit(model_args, training_args)
    if data_args.use_packed_ds and data_args.group_by_length:
        raise ValueError("--use_packed_ds and --group_by_length exclude each other")
    trainable = not (model_args.freeze_llm and model_args.freeze_backbone and model_args.freeze_mlp)
    if not trainable and not (model_args.use_llm_lora or model_args.use_backbone_lora
                              or model_args.unfreeze_vit_layers or model_args.unfreeze_lm_head):
        raise ValueError("every part is frozen and no LoRA is enabled: nothing would train")


def _check_4bit(model_args: ModelArguments, training_args: TrainingArguments) -> None:
    """--load_in_4bit trains adapters on a frozen 4-bit LLM, one process per GPU: refuse what contradicts that."""
    if not model_args.load_in_4bit:
        return
    if not model_args.use_llm_lora:
        raise ValueError("--load_in_4bit needs --use_llm_lora R (a 4-bit LLM trains only through LoRA adapters)")
    if model_args.freeze_llm is False or model_args.unfreeze_lm_head:
        raise ValueError("--load_in_4bit keeps the LLM frozen: drop --freeze_llm False / --unfreeze_lm_head")
    if getattr(training_args, "deepspeed", None):
        raise ValueError("--load_in_4bit runs without DeepSpeed (one process per GPU holds the whole 4-bit model); "
                         "drop --deepspeed (MODE=qlora of src/shell/medrega_stage2.sh does)")


#: flag -> (argument group, allowed interval): numeric flags out of range are refused up front.
_RANGES: dict[str, tuple[str, str]] = {
    "use_llm_lora": ("model", "[0, inf)"), "use_backbone_lora": ("model", "[0, inf)"),
    "lora_dropout": ("model", "[0, 1)"), "drop_path_rate": ("model", "[0, 1)"),
    "grad_checkpoint_skip_llm_layers": ("model", "[0, inf)"),
    "max_seq_length": ("data", "[8, inf)"), "down_sample_ratio": ("data", "(0, 1]"),
    "force_image_size": ("data", "[1, inf)"), "min_dynamic_patch": ("data", "[1, inf)"),
    "max_dynamic_patch": ("data", "[1, inf)"),
    "learning_rate": ("training", "(0, inf)"), "per_device_train_batch_size": ("training", "[1, inf)"),
    "gradient_accumulation_steps": ("training", "[1, inf)"), "num_train_epochs": ("training", "(0, inf)"),
    "dataloader_num_workers": ("training", "[0, inf)"), "logging_steps": ("training", "(0, inf)"),
    "weight_decay": ("training", "[0, inf)"), "max_nonfinite_steps": ("training", "[0, inf)"),
}


def _check_ranges(groups: dict[str, Any]) -> None:
    for name, (group, interval) in _RANGES.items():
        value = getattr(groups[group], name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        low, high = (float(x) for x in interval[1:-1].split(", "))
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
        if not (math.isfinite(value) and above and below):
            raise ValueError(f"--{name} must be in {interval} and finite, got {value}")


def resolved_config(model_args: ModelArguments, data_args: DataTrainingArguments,
                    training_args: TrainingArguments, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """All flags after defaults and validation, as a JSON-able dict (saved as `run_config.json` with every run).

    The dict can be fed back to `medrega-train run_config.json` to repeat the run.
    """
    train_dict = {k: v for k, v in training_args.to_dict().items() if not k.startswith("_")}
    # to_dict() replaces tokens by placeholders; keep only the fields that are real dataclass inputs
    init_fields = {f.name for f in dataclasses.fields(training_args) if f.init}
    train_dict = {k: v for k, v in train_dict.items() if k in init_fields}
    out: dict[str, Any] = {
        "model": dataclasses.asdict(model_args),
        "data": dataclasses.asdict(data_args),
        "training": json.loads(json.dumps(train_dict, default=str)),
    }
    if extra:
        out["resolved"] = extra
    return out
