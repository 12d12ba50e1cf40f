"""`MedRegTrainer`: transformers' Trainer with the pieces InternVL fine-tuning needs.

The loss (`internvl.ops.causal_lm_loss`, the model's too) is divided by the supervised tokens of the whole optimizer
step over all micro-batches and ranks, so every token weighs the same however samples fall into micro-batches.
Atomic checkpoints with a per-rank manifest, PEFT adapters for LoRA runs, length-grouped sampling deterministic per
epoch, tokens/s logs, the divergence guard and the count of records skipped in lenient runs.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler
from transformers import TrainerCallback

from internvl.compat import fsdp_on_cpu, plain_cuda_arch_list, trainer_base
from internvl.ops.cross_entropy import (
    causal_lm_loss,
    fused_head_supported,
    loss_items,
    zero3_partitioned_head,
)
from internvl.ops.train_speedups import (
    TrainSpeedups,
    apply_train_speedups,
    fused_loss_forward,
    remove_train_speedups,
)
from internvl.tokenization import save_tokenizer
from internvl.train import checkpoint as ckpt
from internvl.data.collate import SAMPLE_INDEX_KEY, SKIPPED_KEY
from internvl.train.guards import StepGuard, assert_finite_model, guard_optimizer_step
from internvl.train.manifest import merge_manifests, write_rank_manifest
from internvl.train.skips import SkipReport
from internvl.train.lora import has_lora, load_lora_run, save_lora_run

# Batch keys the trainer reads itself and never passes to the model (`num_samples`: samples of a packed batch).
TRAINER_ONLY_KEYS = ("labels", "loss_weight", "num_samples", SAMPLE_INDEX_KEY, SKIPPED_KEY)
logger = logging.getLogger("internvl.train")


class LengthGroupedSampler(Sampler[int]):
    """LLaVA/InternVL-style length grouping: shuffle, cut into megabatches of `group_size` samples, sort each
    megabatch by length (longest first). Order depends only on (seed, epoch), so a resumed run sees the same order.
    """

    def __init__(self, lengths: list[int], group_size: int, seed: int = 0) -> None:
        self.lengths = [int(x) for x in lengths]
        self.group_size = group_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        for start in range(0, len(order), self.group_size):
            group = sorted(order[start:start + self.group_size], key=lambda i: -self.lengths[i])
            yield from group


class RunCallback(TrainerCallback):
    """Train begin: the training fast paths (`internvl.ops.train_speedups`, once the model is on its device and
    checkpointing is configured), the throughput clock, step skipping for `--on_nonfinite skip`. Train end: a plain
    model again; cuDNN attention back on after DeepCompile (`_prepare_engine`). Each epoch: the dataset's epoch (its
    augmentation is seeded by seed, epoch and index; accelerate forwards it only where the sampler has no `set_epoch`).
    """

    def __init__(self, trainer: "MedRegTrainer") -> None:
        self.trainer = trainer
        self.report: dict[str, Any] | None = None  # what `apply_train_speedups` turned on, until train end

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer
        if trainer.speedups is not None and model is not None and self.report is None:
            self.report = apply_train_speedups(model, trainer.speedups, device=args.device)
        trainer._last_log_time = time.perf_counter()
        if optimizer is not None and trainer.guard.policy == "skip":
            guard_optimizer_step(optimizer, trainer.guard)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and self.report is not None:
            remove_train_speedups(model)
            self.report = None
        self.trainer._restore_engine()

    def on_epoch_begin(self, args, state, control, **kwargs):
        if hasattr(self.trainer.train_dataset, "set_epoch"):
            self.trainer.train_dataset.set_epoch(int(state.epoch or 0))


class MedRegTrainer(trainer_base()):
    """Trainer with per-token loss over the accumulated batch, atomic checkpoints, LoRA saving, throughput logs.

    Changes transformers' Trainer only through the hooks of `internvl.compat.trainer_base`, public methods and
    callbacks. Extra arguments: `group_by_length` (uses the dataset's `lengths`), `base_model` (recorded in LoRA
    runs), `fused_lm_loss` (`fused_loss_forward`) and `speedups` (`TrainSpeedups`, applied on CUDA; None = eager).
    """

    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, group_by_length: bool = False, base_model: str | None = None,
                 fused_lm_loss: bool = False, speedups: TrainSpeedups | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length
        self.fused_lm_loss = fused_lm_loss
        self.speedups = speedups
        self.base_model = base_model
        self._tokens_seen = 0
        self._samples_seen = 0
        self._last_log_time: float | None = None
        self._staging = False  # True while save_checkpoint writes into the staging folder
        self.guard = StepGuard(policy=getattr(self.args, "on_nonfinite", "stop"),
                               max_skipped=getattr(self.args, "max_nonfinite_steps", 10),
                               describe=getattr(self.train_dataset, "describe", None),
                               check_grad_norm=not self.args.fp16)  # fp16: the loss scaler skips overflow steps
        self.add_callback(RunCallback(self))
        self.skips = SkipReport(self.train_dataset)
        self.skip_report: dict[str, Any] | None = None  # set at the end of a lenient run
        self._cudnn_sdpa_off = False  # True while DeepCompile trains (restored at train end)
        self._prepare_engine()

    def _prepare_engine(self) -> None:
        """What the engine needs from this process before `train()`: DeepSpeed's op builds (the shipped configs'
        FusedAdam) get a `TORCH_CUDA_ARCH_LIST` they can parse; DeepCompile trains without torch's cuDNN attention
        (its inductor graph fails on that op with torch 2.13 + DeepSpeed 0.19.8); `--fsdp` with `--use_cpu` really
        shards (`compat.fsdp_on_cpu`: accelerate would drop FSDP on the CPU and train the unsharded model)."""
        if self.args.deepspeed and (arch_list := plain_cuda_arch_list()):
            logger.warning("TORCH_CUDA_ARCH_LIST set to %r for DeepSpeed's op builds (it cannot parse '9.0a'-style "
                           "entries)", arch_list)
        ds_config = getattr(getattr(self.args, "hf_deepspeed_config", None), "config", None) or {}
        if (ds_config.get("compile") or {}).get("deepcompile") and torch.backends.cuda.cudnn_sdp_enabled():
            torch.backends.cuda.enable_cudnn_sdp(False)
            self._cudnn_sdpa_off = True
            logger.info("DeepCompile: torch's cuDNN attention is off for this run (its compiled graph fails on it)")
        if self.args.fsdp and self.args.use_cpu:
            fsdp_on_cpu(self)
            logger.info("FSDP2 on the CPU (gloo): accelerate's FSDP plugin installed for this run")

    def _restore_engine(self) -> None:
        """Undo `_prepare_engine`'s process-wide switch (torch's cuDNN attention), at train end or when train fails."""
        if self._cudnn_sdpa_off:
            torch.backends.cuda.enable_cudnn_sdp(True)
            self._cudnn_sdpa_off = False

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; a failed run also gives back what `_prepare_engine` switched off for the process."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._restore_engine()

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Takes the bookkeeping keys (sample indices, build-time skips) off the batch, then trains as usual."""
        self.guard.note_batch(inputs.pop(SAMPLE_INDEX_KEY, None), self.running_loss())
        self.skips.add_batch(inputs.pop(SKIPPED_KEY, None))
        return super().training_step(model, inputs, num_items_in_batch)

    def step_grad_norm(self, model: nn.Module, grad_norm: Any, default) -> Any:
        """Trainer's gradient norm, checked with the step's loss (one host read per optimizer step): raises
        `NonFiniteError`, or marks the step to be skipped (`--on_nonfinite skip`)."""
        grad_norm = default(model, grad_norm=grad_norm)
        ok = self.guard.check_step(self.state.global_step + 1, grad_norm, self.running_loss(), self.args.world_size)
        self.guard.skip_next_step = not ok
        return grad_norm

    def train_sampler(self, train_dataset, default):
        """Length-grouped sampling with `group_by_length`, else Trainer's sampler."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.group_by_length:
            return default(train_dataset)
        lengths = getattr(dataset, "lengths", None)
        if lengths is None:
            raise ValueError(f"--group_by_length needs a dataset with `lengths`; {type(dataset).__name__} has none")
        group = self.args.train_batch_size * self.args.gradient_accumulation_steps * max(self.args.world_size, 1)
        return LengthGroupedSampler(list(lengths), group_size=group, seed=self.args.seed)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Trainer's rule (no decay for biases and for norms it knows by class or name), plus every parameter of any
        normalisation module whatever its name: InternViT's RMSNorm `norm1`/`norm2` and q/k norms otherwise decay."""
        norms = {f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
                 if "norm" in type(module).__name__.lower() for name, _ in module.named_parameters(recurse=False)}
        return [n for n in super().get_decay_parameter_names(model) if n not in norms]

    def optimizer_parameter_groups(self, model: nn.Module | None = None) -> list[dict[str, Any]]:
        """The trainable parameters in two weight-decay groups, as `Trainer.create_optimizer` makes them: decay for
        what `get_decay_parameter_names` names, none for norms and biases. Empty groups are left out."""
        model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def create_optimizer(self, model: nn.Module | None = None):
        """Trainer's optimizer. With a DeepSpeed config that names its own optimizer, transformers hands DeepSpeed one
        group of every trainable parameter (weight decay would hit norms and biases too): that placeholder gets the
        same groups as the path without DeepSpeed (accelerate's `DummyOptim`, known by name as transformers knows
        its `DummyScheduler`). Logs the groups."""
        if type(self.optimizer).__name__ == "DummyOptim":
            self.optimizer.params = groups = self.optimizer_parameter_groups(model)
        else:
            groups = super().create_optimizer(model).param_groups
        if self.args.should_log:  # the same line with and without DeepSpeed (tests/train/test_train_distributed.py)
            logger.info("optimizer parameter groups: %s", "; ".join(
                f"weight_decay {g['weight_decay']}: {len(g['params'])} tensors, "
                f"{sum(int(getattr(p, 'ds_numel', 0) or p.numel()) for p in g['params'])} values"
                for g in groups if g["params"]))
        return self.optimizer

    def step_loss_items(self, batch_samples: list, device: torch.device, default=None) -> torch.Tensor | None:
        """Supervised tokens (or summed weights) of the whole optimizer step, summed over ranks."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        total = sum(loss_items(b["labels"], b.get("loss_weight")) for b in batch_samples).to(device)
        if self.args.world_size > 1:
            total = self.accelerator.gather(total.reshape(1)).sum()
        return total

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        """Weighted token CE summed and divided by `num_items_in_batch` (else this micro-batch's count, e.g. in eval),
        times the number of data-parallel processes: DDP/DeepSpeed average gradients over ranks while the divisor
        already counts every rank's tokens."""
        labels = inputs["labels"]
        loss_weight = inputs.get("loss_weight")
        model_inputs = {k: v for k, v in inputs.items() if k not in TRAINER_ONLY_KEYS}
        mask = inputs.get("attention_mask")
        if model.training:  # running sums stay on the device, read once per log: no host sync per micro-batch
            padded = mask is not None and mask.dim() == 2 and mask.dtype != torch.int32
            self._tokens_seen = self._tokens_seen + (mask.sum() if padded else inputs["input_ids"].numel())
            num_samples = inputs.get("num_samples")  # packed batches: samples, not rows
            self._samples_seen = self._samples_seen + (num_samples if num_samples is not None
                                                       else inputs["input_ids"].shape[0])
        lm_head = self._fused_head()
        if lm_head is not None:
            # The head runs on supervised positions only, in chunks, outside the model's autocast-wrapped forward:
            # the accelerator's autocast keeps its matmuls in bf16 under mixed precision (fp32 weights otherwise).
            with self.accelerator.autocast():
                loss, outputs = fused_loss_forward(model, model_inputs, labels, loss_weight=loss_weight,
                                                   lm_head=lm_head, num_items_in_batch=num_items_in_batch)
        else:
            outputs = model(**model_inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            loss = causal_lm_loss(logits, None, labels, loss_weight=loss_weight, num_items_in_batch=num_items_in_batch)
        if num_items_in_batch is not None and self.args.world_size > 1:
            loss = loss * float(self.accelerator.num_processes)
        return (loss, outputs) if return_outputs else loss

    def _fused_head(self) -> nn.Module | None:
        """The LM head for the fused loss, or None for the plain path (switched off, head wrapped by PEFT, no separate
        head). A ZeRO-3-partitioned head runs through its own forward, gathered by its hooks (`fused_loss_forward`)."""
        if not self.fused_lm_loss:
            return None
        language_model = getattr(self.model, "language_model", self.model)
        get_head = getattr(language_model, "get_output_embeddings", None)
        head = get_head() if get_head is not None else None
        if head is None:
            return None
        if fused_head_supported(head):
            return head
        # DeepCompile removes the ZeRO-3 hooks (it gathers inside the compiled model only): the plain path there
        engine = self.model_wrapped
        deepcompile = callable(getattr(engine, "is_deepcompile_active", None)) and engine.is_deepcompile_active()
        return head if zero3_partitioned_head(head) and not deepcompile else None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds `tokens_per_second`, `samples_per_second` (all ranks, since the previous log) and, on GPU, this rank's
        `gpu_mem_peak_gib` to training logs; the skip counts of the guard and of lenient runs."""
        if "loss" in logs:
            now = time.perf_counter()
            counts = torch.stack([torch.as_tensor(c, device=self.args.device).to(torch.float64).reshape(())
                                  for c in (self._tokens_seen, self._samples_seen)])
            if self.args.world_size > 1 and dist.is_initialized():
                dist.all_reduce(counts)
            if self._last_log_time is not None:
                elapsed = max(now - self._last_log_time, 1e-9)
                logs["tokens_per_second"] = round(float(counts[0]) / elapsed, 2)
                logs["samples_per_second"] = round(float(counts[1]) / elapsed, 3)
            if torch.cuda.is_available():
                logs["gpu_mem_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            self._tokens_seen = 0
            self._samples_seen = 0
            self._last_log_time = now
            if self.guard.skipped_steps:
                previous = max((e["step"] for e in self.state.log_history if "loss" in e), default=0)
                logs["loss"] = self.guard.window_loss(logs["loss"], self.state.global_step, previous)
                logs["nonfinite_steps_skipped"] = len(self.guard.skipped_steps)
            if self.skips.build_count:
                logs["records_skipped_in_training"] = self.skips.build_count  # this rank; all ranks at the end
        if "train_runtime" in logs and self.skips.lenient:  # the final metrics: the whole skip report (all ranks)
            self.skip_report = self.skips.gathered()
            logs.update(SkipReport.summary_fields(self.skip_report))
        super().log(logs, *args, **kwargs)

    def checkpoint_dir(self, trial, default) -> str:
        """The run folder, or its staging folder while a checkpoint is being written."""
        run_dir = default(trial)
        return str(ckpt.staging_root(run_dir)) if self._staging else run_dir

    def save_checkpoint(self, model: nn.Module, trial, default) -> None:
        """Write checkpoint-N into the staging folder (`checkpoint_dir`), hash it per rank into a manifest, then
        publish it with an atomic rename. A model with non-finite parameters is never written."""
        assert_finite_model(model, f"checkpoint-{self.state.global_step}", self.args.world_size)
        run_dir = self.run_dir(trial)
        if self.args.should_save:
            ckpt.clean_staging(run_dir)
        self._barrier()
        self._staging = True
        try:
            default(model, trial)
        finally:
            self._staging = False
        self._barrier()
        staged = ckpt.staging_root(run_dir) / f"checkpoint-{self.state.global_step}"
        write_rank_manifest(staged, self.args.process_index, self.args.world_size)
        self._barrier()
        if self.args.should_save:
            merge_manifests(staged)
            final = ckpt.publish_checkpoint(staged, run_dir)
            ckpt.rotate_checkpoints(run_dir, self.args.save_total_limit, keep=final)
        self._barrier()

    def _barrier(self) -> None:
        if self.args.world_size > 1 and dist.is_initialized():
            dist.barrier()

    def save_model_files(self, output_dir: str | None, state_dict: dict | None, default) -> None:
        """Full runs: original-layout `save_pretrained`. LoRA runs: PEFT adapters + other trained weights. Both write
        the tokenizer with `save_tokenizer` (Trainer's `save_pretrained` leaves out the SentencePiece files)."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not has_lora(self.model):
            default(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        if has_lora(self.model):
            os.makedirs(output_dir, exist_ok=True)
            save_lora_run(self.model, output_dir, state_dict=state_dict, base_model=self.base_model)
            if hasattr(self.model, "config"):
                self.model.config.save_pretrained(output_dir)
        else:  # Trainer's pickled `training_args.bin` (read by nothing) becomes `training_args.json`
            Path(output_dir, "training_args.bin").unlink(missing_ok=True)
            Path(output_dir, "training_args.json").write_text(self.args.to_json_string(), encoding="utf-8")
        if self.processing_class is not None:
            save_tokenizer(self.processing_class, output_dir)

    def load_checkpoint_weights(self, resume_from_checkpoint: str, model: nn.Module | None, default) -> None:
        """LoRA runs reload adapters + other trained weights; full runs use Trainer's safetensors loading."""
        model = self.model if model is None else model
        if not has_lora(model):
            return default(resume_from_checkpoint, model)
        load_lora_run(model, resume_from_checkpoint, is_trainable=True)
        return None
