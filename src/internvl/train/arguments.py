"""Command-line arguments of `medrega-train`, as dataclasses parsed by `transformers.HfArgumentParser`.

Flag names follow the original InternVL/MedRegA fine-tuning script (`internvl_chat_finetune.py`) wherever such a flag
exists, so the released shell recipes translate one to one (`--model_name_or_path`, `--meta_path`, `--freeze_llm`,
`--use_llm_lora 16`, `--force_image_size 448`, `--conv_style Hermes-2`, ...). New options (start from a preset with
random init, packing, strict/lenient data checks) are additions, never renames.

Three groups:
- `ModelArguments`: where the weights come from, what is frozen, LoRA ranks, vision overrides.
- `DataTrainingArguments`: meta file, template, sequence length, image size, packing, data-check mode.
- `MedRegTrainingArguments`: `transformers.TrainingArguments` plus our defaults (safetensors, no column pruning,
  non-reentrant gradient checkpointing) and `resume_from_checkpoint="auto"`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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

    model_name_or_path: str | None = _arg(None, "Local directory of an InternVL-Chat checkpoint in the original "
                                                "layout (config.json + safetensors). Mutually exclusive with "
                                                "--preset.")
    preset: str | None = _arg(None, "Start from a bundled preset (tiny, mid, medrega, internvl-chat-v1-2) with random "
                                    "init. Needs --tokenizer_path. Used to train the bundled default model from "
                                    "scratch.")
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
    fused_lm_loss: bool = _arg(True, "Compute the LM head + cross-entropy only on supervised positions, chunk by "
                                     "chunk (internvl.ops.causal_lm_loss; kernel chosen by --lm_loss_impl) instead of "
                                     "building [batch, seq, vocab] logits. Falls back to the plain loss when the LM "
                                     "head is LoRA-wrapped; a ZeRO-3-partitioned head runs it as its own forward "
                                     "(gathered by its hooks).")
    lm_loss_impl: Literal["auto", "padded", "liger", "chunked"] = _arg(
        "auto", "Kernel of the fused LM-head loss (internvl.ops.linear_cross_entropy): auto = padded on CUDA "
                "(vocabulary padded to a multiple of 128, compiled softmax/grad), chunked on the CPU; liger = "
                "liger-kernel's fused linear cross-entropy.")
    compile_layers: bool = _arg(True, "CUDA: torch.compile each LLM decoder layer and ViT block (one compiled graph "
                                      "per layer class; gradient checkpointing traced into it). Off on the CPU, under "
                                      "DeepSpeed ZeRO-3 and in LoRA-wrapped towers (internvl.ops.train_speedups).")
    fuse_projections: bool = _arg(True, "CUDA, compiled layers only: q/k/v and gate/up as one matmul each (torch.cat "
                                        "of the weights at run time; parameters, state-dict keys and LoRA targets "
                                        "unchanged).")
    fast_kernels: bool = _arg(True, "CUDA + liger-kernel: fused RMSNorm / SwiGLU / RoPE kernels on the modules that "
                                    "are not compiled (all of them with --compile_layers False).")
    grad_checkpoint_skip_llm_layers: int = _arg(0, "With --grad_checkpoint, leave the last N LLM layers "
                                                   "un-checkpointed (faster, more activation memory: about 0.6 GiB "
                                                   "per layer for 8 x 1024 tokens at width 2048).")
    load_in_4bit: bool = _arg(False, "QLoRA: load the LLM's linear layers in 4 bit (bitsandbytes, via transformers' "
                                     "BitsAndBytesConfig); ViT, projector and LM head keep the model dtype (bf16 with "
                                     "--bf16). Needs --use_llm_lora; one process per GPU, no DeepSpeed "
                                     "(internvl.train.qlora).")
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = _arg("nf4", "4-bit data type with --load_in_4bit (QLoRA's "
                                                             "NormalFloat4 by default).")
    use_bnb_nested_quant: bool = _arg(True, "With --load_in_4bit: quantise the block scales too (QLoRA's double "
                                            "quantisation).")
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = _arg(
        "auto", "dtype the weights are loaded in; auto = float32 (the Trainer/DeepSpeed handle bf16 autocast / bf16 "
                "master weights).")


@dataclass
class DataTrainingArguments:
    """What the model is trained on and how samples become tensors."""

    meta_path: str | None = _arg(None, "meta_file.json: dataset name -> {root, annotation, repeat_time, ...}.")
    conv_style: str = _arg("Hermes-2", "Chat template name (internvl/templates).")
    max_seq_length: int = _arg(2048, "Samples are truncated to this many tokens.")
    force_image_size: int | None = _arg(None, "Tile size in pixels (448 for V1.2). Differs from the checkpoint -> "
                                              "position embeddings are resized once; with --preset it sets the ViT "
                                              "image size.")
    down_sample_ratio: float = _arg(0.5, "Pixel-shuffle ratio (0.5 -> 4x fewer tokens).")
    pad2square: bool = _arg(False, "Pad images to a square before resizing.")
    dynamic_image_size: bool = _arg(False, "Dynamic tiling (off for V1.2/MedRegA).")
    use_thumbnail: bool = _arg(False, "Add a thumbnail tile with dynamic tiling.")
    min_dynamic_patch: int = _arg(1, "Minimum tiles with dynamic tiling.")
    max_dynamic_patch: int = _arg(1, "Maximum tiles with dynamic tiling.")
    group_by_length: bool = _arg(False, "Length-grouped sampling (megabatches of similar length).")
    data_check: Literal["strict", "lenient"] = _arg("strict", "strict: any bad record aborts with FILE:LINE: reason. "
                                                              "lenient: bad records are reported (FILE:LINE: reason, "
                                                              "and counted) and left out.")
    use_packed_ds: bool = _arg(False, "Pack the per_device_train_batch_size samples of a micro-batch into as few rows "
                                      "of max_packed_tokens as fit (attention stays per sample).")
    max_packed_tokens: int = _arg(8192, "Tokens per packed row.")
    num_images_expected: int = _arg(12, "Max image tiles per packed row.")
    loss_reduction: Literal["token", "sample", "square"] = _arg(
        "token", "Per-token loss weight under packing: token (1), sample (1/n), square (1/sqrt n).")


@dataclass
class MedRegTrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with defaults suited to InternVL fine-tuning.

    `resume_from_checkpoint="auto"` resumes from the newest *complete* checkpoint in `output_dir` (see
    `internvl.train.checkpoint.find_latest_checkpoint`); a path resumes from that checkpoint.
    """

    remove_unused_columns: bool = _arg(False, "Keep every collated key (pixel_values...).")
    report_to: str | None = _arg("tensorboard", "tensorboard | wandb | all | none.")
    overwrite_output_dir: bool = _arg(False, "Allow a fresh run in an output_dir that already holds checkpoints "
                                             "(otherwise: error unless --resume_from_checkpoint is given).")
    save_safetensors: bool = _arg(True, "Always safetensors.")
    logging_steps: float = _arg(1, "Log every N optimizer steps.")
    dataloader_num_workers: int = _arg(0, "Data loader worker processes.")
    warmup_ratio: float = _arg(0.0, "Original flag (transformers 5 folds it into --warmup_steps < 1): fraction of the "
                                    "steps spent warming up. Used when --warmup_steps is 0.")
    evaluation_strategy: str | None = _arg(None, "Original flag name of --eval_strategy (no | steps | epoch).")
    on_nonfinite: Literal["stop", "skip"] = _arg("stop", "A non-finite loss or gradient norm at an optimizer step: "
                                                         "stop the run with an error naming the step and the batch's "
                                                         "records, or skip that step and count it (not with "
                                                         "DeepSpeed).")
    max_nonfinite_steps: int = _arg(10, "With --on_nonfinite skip: the run stops at the next non-finite step after "
                                        "this many skipped ones.")
    fsdp_frozen_towers: Literal["replicated", "sharded"] = _arg(
        "replicated", "With --fsdp: the frozen ViT and projector are kept out of FSDP, whole (bf16 under --bf16) on "
                      "every GPU (replicated: no per-step gathers; costs their weights on each GPU, ~11.9 GB for "
                      "InternViT-6B), or sharded like the LLM (the previous behaviour). A trainable tower is always "
                      "sharded. See internvl/train/fsdp.py.")
    logging_nan_inf_filter: bool = _arg(False, "transformers' filter that logs a NaN/inf loss as the running average "
                                               "(a host sync per micro-batch). Off: the divergence guard "
                                               "(--on_nonfinite) handles non-finite losses.")

    def __post_init__(self) -> None:
        if self.max_nonfinite_steps < 0:
            raise ValueError(f"--max_nonfinite_steps must be >= 0, got {self.max_nonfinite_steps}")
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


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, MedRegTrainingArguments]:
    """Parse `argv` (default: sys.argv[1:]) into the three argument groups and check them together.

    A single `.json`/`.yaml` argument is read as a config file holding all flags (the resolved `run_config.json` of an
    earlier run works). Raises `ValueError` with a readable message on inconsistent flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        path = Path(argv[0])
        if path.suffix == ".json":
            raw = json.loads(path.read_text(encoding="utf-8"))
            flat = {**raw.get("model", {}), **raw.get("data", {}), **raw.get("training", {})} if "model" in raw else raw
            model_args, data_args, training_args = parser.parse_dict(flat, allow_extra_keys=False)
        else:
            model_args, data_args, training_args = parser.parse_yaml_file(str(path))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    validate_args(model_args, data_args, training_args)
    return model_args, data_args, training_args


FREEZE_FLAGS = ("freeze_llm", "freeze_backbone", "freeze_mlp")


def resolve_freeze_defaults(model_args: ModelArguments) -> ModelArguments:
    """Give every freeze flag left unset (None) its default, in place; returns `model_args`.

    With LoRA on (`--use_llm_lora` or `--use_backbone_lora`), a tower whose flag was not given is frozen: only the
    adapters train, as in the original LoRA recipes (InternVL's "continue_lora": everything frozen + `use_llm_lora
    16`; MedRegA stage 2: ViT and projector frozen). Without LoRA nothing is frozen unless asked (the original
    trainer's defaults). A tower unfrozen on purpose under LoRA trains fully; the build warns about it.
    """
    lora = bool(model_args.use_llm_lora or model_args.use_backbone_lora)
    for name in FREEZE_FLAGS:
        if getattr(model_args, name) is None:
            setattr(model_args, name, lora)
    return model_args


def validate_args(model_args: ModelArguments, data_args: DataTrainingArguments,
                  training_args: TrainingArguments) -> None:
    """Resolve the freeze defaults and reject contradictory flag combinations early, before any weights load."""
    resolve_freeze_defaults(model_args)
    if (model_args.model_name_or_path is None) == (model_args.preset is None):
        raise ValueError("give exactly one of --model_name_or_path (a checkpoint dir) or --preset (random init)")
    if model_args.preset is not None and model_args.tokenizer_path is None:
        raise ValueError("--preset needs --tokenizer_path (a local tokenizer directory)")
    if data_args.meta_path is None:
        raise ValueError("--meta_path is required (a meta_file.json; see src/shell/meta_file.json)")
    if model_args.grad_checkpoint_skip_llm_layers < 0:
        raise ValueError("--grad_checkpoint_skip_llm_layers must be >= 0")
    if model_args.use_llm_lora < 0 or model_args.use_backbone_lora < 0:
        raise ValueError("LoRA ranks must be >= 0")
    _check_ranges(model_args, data_args, training_args)
    _check_4bit(model_args, training_args)
    if data_args.max_seq_length < 8:
        raise ValueError(f"--max_seq_length {data_args.max_seq_length} is too small")
    if not 0 < data_args.down_sample_ratio <= 1:
        raise ValueError(f"--down_sample_ratio must be in (0, 1], got {data_args.down_sample_ratio}")
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


#: (group, field, lowest allowed, include the lowest) for numeric flags: out-of-range values are refused up front.
_RANGES: tuple[tuple[str, str, float, bool], ...] = (
    ("model", "lora_dropout", 0.0, True), ("model", "drop_path_rate", 0.0, True),
    ("data", "force_image_size", 1, True), ("data", "min_dynamic_patch", 1, True),
    ("data", "max_dynamic_patch", 1, True),
    ("training", "learning_rate", 0.0, False), ("training", "per_device_train_batch_size", 1, True),
    ("training", "gradient_accumulation_steps", 1, True), ("training", "num_train_epochs", 0.0, False),
    ("training", "dataloader_num_workers", 0, True), ("training", "logging_steps", 0.0, False),
    ("training", "weight_decay", 0.0, True),
)


def _check_ranges(model_args: Any, data_args: Any, training_args: Any) -> None:
    groups = {"model": model_args, "data": data_args, "training": training_args}
    for group, name, low, inclusive in _RANGES:
        value = getattr(groups[group], name, None)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok = math.isfinite(value) and (value >= low if inclusive else value > low)
        if not ok:
            raise ValueError(f"--{name} must be {'>=' if inclusive else '>'} {low} and finite, got {value}")
    if getattr(model_args, "lora_dropout", 0) >= 1 or getattr(model_args, "drop_path_rate", 0) >= 1:
        raise ValueError("--lora_dropout and --drop_path_rate must be below 1")


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
