"""`medrega-train` (= `python -m internvl.train`): fine-tune InternVL-Chat / MedRegA on MedRegInstruct-format data.

    medrega-train --model_name_or_path /ckpt/medrega --meta_path meta_file.json --output_dir runs/lora \\
        --use_llm_lora 16 --bf16 True

Every run writes `run_config.json` (all flags after defaults, versions, world size; it can be fed back to repeat the
run) and atomic `checkpoint-N/` folders to `--output_dir`; `--resume_from_checkpoint auto` continues from the newest
one that verifies. The final model is saved in the original layout, or as PEFT adapters for LoRA runs
(`medrega-merge-lora` merges them). The shell recipes in `src/shell` are thin wrappers over this command.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

from internvl.offline import enforce_offline

# Before transformers: `from transformers import set_seed` imports peft -> bitsandbytes, whose CPU backend asks the hub
# for kernels at import unless offline mode is already on.
enforce_offline()

import torch
import torch.distributed as dist
import transformers
from transformers import set_seed
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from internvl.cli_support import UsageError, run_cli
from internvl.data.collate import PackedCollator, pad_collate
from internvl.data.dataset import build_training_dataset
from internvl.data.records import BadRecordError
from internvl.io_safety import atomic_write_text, check_output_dir
from internvl.ops.train_speedups import TrainSpeedups
from internvl.train.arguments import (
    DataTrainingArguments,
    MedRegTrainingArguments,
    ModelArguments,
    parse_args,
    resolved_config,
)
from internvl.train.build import build_model_and_tokenizer
from internvl.train.checkpoint import (
    checkpoint_problems,
    clean_staging,
    find_latest_checkpoint,
    select_resume_checkpoint,
    verify_checkpoint,
)
from internvl.train.fsdp import place_frozen_towers
from internvl.train.guards import NonFiniteError, assert_finite_model
from internvl.train.safe_load import deepspeed_safe_loads
from internvl.train.skips import SkipReport
from internvl.train.trainer import MedRegTrainer

logger = logging.getLogger("internvl.train")

RUN_CONFIG_NAME = "run_config.json"


def resolve_resume(training_args: MedRegTrainingArguments) -> str | None:
    """Resolve `--resume_from_checkpoint` in place and return it: `auto` -> the newest checkpoint in output_dir that
    verifies against its manifest (newer ones that fail are named and moved aside, `checkpoint-N.rejected`), None if
    there is none; a given path must be complete and verify. `UsageError` (exit 2) if checkpoints exist but none
    verifies, if a given one does not, or if a fresh run would start over existing checkpoints."""
    value, output_dir = training_args.resume_from_checkpoint, training_args.output_dir
    resume = None
    if value in ("auto", "true", "True"):
        chosen, problems = select_resume_checkpoint(output_dir, verify=verify_checkpoint,
                                                    move_aside=training_args.should_save)
        if chosen is None and problems and not training_args.overwrite_output_dir:
            raise UsageError(f"{output_dir}: no checkpoint verifies, so none can be resumed:\n  "
                             + "\n  ".join(problems) + "\npass --overwrite_output_dir True to start over")
        resume = None if chosen is None else str(chosen)
    elif value not in (None, "", "no", "false", "False"):
        problems = checkpoint_problems(value, verify_checkpoint)
        if problems:
            raise UsageError(f"{value}: refusing to resume from a checkpoint that does not verify:\n  "
                             + "\n  ".join(problems))
        resume = str(value)
    existing = find_latest_checkpoint(output_dir)
    if resume is None and existing is not None and not training_args.overwrite_output_dir:
        raise UsageError(f"{output_dir} already holds {existing.name}: pass --resume_from_checkpoint auto to continue "
                         "or --overwrite_output_dir True to start over")
    training_args.resume_from_checkpoint = resume
    return resume


def build_data(data_args: DataTrainingArguments, tokenizer: Any, model_config: Any, seed: int):
    """Training dataset and collator from the meta file, through the shared data core (records checks, encode)."""
    dataset = build_training_dataset(
        data_args.meta_path,
        tokenizer=tokenizer,
        config=model_config,
        template=data_args.conv_style,
        max_seq_length=data_args.max_seq_length,
        strict=data_args.data_check == "strict",
        seed=seed,
    )
    if data_args.use_packed_ds:
        collator = PackedCollator(max_packed_tokens=data_args.max_packed_tokens,
                                  num_images_expected=data_args.num_images_expected,
                                  loss_reduction=data_args.loss_reduction,
                                  pad_token_id=tokenizer.pad_token_id or 0)
    else:
        collator = functools.partial(pad_collate, pad_token_id=tokenizer.pad_token_id or 0)
    return dataset, collator


def speedups_from_args(model_args: ModelArguments):
    """The training fast paths the flags ask for (`internvl.ops.train_speedups.TrainSpeedups`)."""
    return TrainSpeedups(compile_layers=model_args.compile_layers, fuse_projections=model_args.fuse_projections,
                         ckpt_skip_llm_layers=model_args.grad_checkpoint_skip_llm_layers if model_args.grad_checkpoint
                         else 0)


def write_run_config(output_dir: str, model_args: ModelArguments, data_args: DataTrainingArguments,
                     training_args: MedRegTrainingArguments, extra: dict[str, Any]) -> Path:
    """Save the resolved configuration of this run (main process only)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    config = resolved_config(model_args, data_args, training_args, extra=extra)
    text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(Path(output_dir) / RUN_CONFIG_NAME, text)


def _setup_logging(training_args: MedRegTrainingArguments) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, stream=sys.stdout)
    logger.setLevel(level)
    logging.getLogger("internvl").setLevel(level)
    # transformers follows --log_level (default "passive": its own default, warnings only)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())


def train(model_args: ModelArguments, data_args: DataTrainingArguments,
          training_args: MedRegTrainingArguments) -> dict[str, Any]:
    """Run one training job end to end; returns the Trainer's train metrics."""
    _setup_logging(training_args)
    output_dir = training_args.output_dir
    resume = resolve_resume(training_args)
    if training_args.should_save:
        clean_staging(output_dir)
    set_seed(training_args.seed)
    # bf16 weights under DeepSpeed bf16, and under QLoRA with --bf16 (the ViT/projector/head stay bf16 next to the
    # 4-bit LLM; the adapters are fp32)
    ds_bf16 = bool(training_args.bf16) and bool(training_args.deepspeed or model_args.load_in_4bit)
    built = build_model_and_tokenizer(model_args, data_args, use_deepspeed_bf16=ds_bf16,
                                      base_save_dir=Path(output_dir) / "base_model",
                                      save_base=training_args.should_save, device=training_args.device)
    dataset, collator = build_data(data_args, built.tokenizer, built.model.config, training_args.seed)
    towers = place_frozen_towers(built.model, training_args)  # FSDP: frozen towers replicated (before the Trainer)
    extra = {
        "world_size": training_args.world_size,
        "base_model_dir": built.base_model_dir,
        "trainable_params": built.trainable_params,
        "trainable_by_tower": built.trainable_by_tower,
        "total_params": built.total_params,
        "num_train_samples": len(dataset),
        "resumed_from": resume,
        "fsdp_frozen_towers": dataclasses.asdict(towers),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "argv": sys.argv,
    }
    if training_args.should_save:
        write_run_config(output_dir, model_args, data_args, training_args, extra)
    trainer = MedRegTrainer(
        model=built.model,
        args=training_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=built.tokenizer,
        group_by_length=data_args.group_by_length,
        base_model=built.base_model_dir,
        fused_lm_loss=model_args.fused_lm_loss,
        speedups=speedups_from_args(model_args),
    )
    with deepspeed_safe_loads():  # DeepSpeed's states load with weights_only=True (internvl.train.safe_load)
        result = trainer.train(resume_from_checkpoint=resume)
    assert_finite_model(trainer.model, f"the final model to {output_dir}", training_args.world_size)
    trainer.save_model(output_dir)
    trainer.save_state()
    metrics = dict(result.metrics)
    if training_args.should_save:
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        if trainer.skip_report is not None:
            write_skip_report(output_dir, trainer.skip_report)
    return metrics


def write_skip_report(output_dir: str, report: dict[str, Any]) -> None:
    """Lenient runs: `skipped_records.json` in the run directory, the counts in run_config.json, a log summary."""
    path = SkipReport.write(report, output_dir)
    config_path = Path(output_dir) / RUN_CONFIG_NAME
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.setdefault("resolved", {})["skipped_records"] = {
            stage: {"skipped": report[stage]["skipped"], "by_reason": report[stage]["by_reason"]}
            for stage in ("scan", "build")}
        atomic_write_text(config_path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    logger.info("lenient data check: %d records left out at the scan %s, %d at build time %s (each replaced by the "
                "next record, served twice); details in %s", report["scan"]["skipped"], report["scan"]["by_reason"],
                report["build"]["skipped"], report["build"]["by_reason"], path)


def _main(argv: list[str] | None) -> int:
    enforce_offline()
    owns_process_group = not (dist.is_available() and dist.is_initialized())  # else a caller's group: left alone
    try:
        model_args, data_args, training_args = parse_args(argv)
    except ValueError as exc:  # inconsistent flags (argparse itself exits 2 with its usage line)
        raise UsageError(str(exc)) from None
    check_output_dir(training_args.output_dir, must_be_empty=False, inputs_inside_ok=True, what="--output_dir",
                     inputs=[model_args.model_name_or_path, model_args.tokenizer_path, data_args.meta_path])
    try:
        train(model_args, data_args, training_args)
        if owns_process_group and dist.is_available() and dist.is_initialized():
            shutdown_process_groups()  # only after a finished run: a barrier after one rank failed would hang
    except NonFiniteError as exc:  # diverged: one line naming the step and records; nothing non-finite was saved
        print(f"medrega-train: error: {exc}", file=sys.stderr)
        return 3
    except BadRecordError:
        if data_args.data_check == "strict":
            print("medrega-train: fix the record, or pass --data_check lenient to leave bad records out "
                  "(they are reported and counted)", file=sys.stderr)
        raise
    finally:
        release_deepspeed_config(training_args)
    return 0


def shutdown_process_groups() -> None:
    """End this run's process groups while the interpreter is fully alive (every rank, after a finished run).

    ZeRO-3 and FSDP2 leave prefetching collectives in flight after the last step; a gloo thread finishing one during
    interpreter shutdown aborts the process (SIGABRT in 3 of 8 two-rank CPU ZeRO-3 runs). gloo's barrier drains the
    work queued before it, then the groups are destroyed."""
    gc.collect()  # engines and optimizers of the finished run let go of their pending work handles
    dist.barrier()
    dist.destroy_process_group()


def release_deepspeed_config(training_args: MedRegTrainingArguments) -> None:
    """Drop transformers' process-global reference to this run's DeepSpeed config when the run ends; while it is
    registered, any later `from_pretrained` in the same process is built under the finished run's ZeRO settings."""
    if training_args.deepspeed:
        unset_hf_deepspeed_config()


def main(argv: list[str] | None = None) -> int:
    """Console entry point. Returns a process exit code: 2 with one line on stderr for bad flags or input (or a
    checkpoint that does not verify), 3 when training diverged (non-finite loss or gradient norm)."""
    return run_cli("medrega-train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
