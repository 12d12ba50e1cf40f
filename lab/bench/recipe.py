"""The released training recipe's shape on one device, through the trainer `medrega-train` runs (`python -m
lab.bench recipe`).

What the recipe fixes: ViT and projector frozen, the full LLM trainable (or LoRA r16 on it), gradient checkpointing
on, micro-batch 4 x 2048 tokens, bf16 (`--bf16 True`). Each model is trained three ways in the same process, same
data and seed: without DeepSpeed (the trainer's default fast paths: fp32 weights under bf16 autocast, as
`medrega-train` builds them), with `src/shell/zero_stage2_config.json` and with `src/shell/zero_stage3_config.json` as
shipped (bf16 weights, DeepSpeed's fp32 master copy) - only `"torch_adam": true` is added unless `fused_adam` is set,
so no CUDA extension is built. The model is built and frozen by `internvl.train.build` and trained by
`internvl.train.trainer.MedRegTrainer` (the same objects `internvl.train.cli.train` makes); only the data is synthetic
(fixed batches of random ids, one 448 px image per sample).

Process group: DeepSpeed needs one even on one device. `single_rank_env` sets MASTER_ADDR=127.0.0.1, a free
MASTER_PORT, RANK=0, LOCAL_RANK=0 and WORLD_SIZE=1 when they are unset, so the plain `python -m lab.bench` command
works; under torchrun the launcher's values are kept. The backend is DeepSpeed's default for the accelerator (nccl on
CUDA, gloo through DeepSpeed's CPU accelerator on the CPU).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile, record_function
from transformers import TrainerCallback

from internvl.model import load_preset

from .batches import fixed_batch
from .flops import H100_H200_BF16_PEAK, lora_params, mfu, recipe_step_flops, shape_of
from .runtime import Deadline, free
from .train_profile import STEP_MARKER, trace_result

ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    """How one recipe case is trained: a shipped config under `src/shell` (DeepSpeed `--deepspeed` JSON, or an FSDP2
    `--fsdp_config` JSON), whether the Trainer's `torch_compile` is on (accelerate then calls the DeepSpeed engine's
    `compile()`), and a DeepCompile switch added to the DeepSpeed config (`"compile": {"deepcompile": true}`)."""

    config: str | None = None
    fsdp: bool = False
    torch_compile: bool = False
    deepcompile: bool = False
    describe: str = ""
    #: FSDP2 only: `medrega-train --fsdp_frozen_towers` (`internvl.train.fsdp.place_frozen_towers`): "replicated"
    #: (the product default: bf16, kept out of FSDP2) or "sharded" (fp32, sharded, cast to bf16 by every unshard).
    fsdp_frozen_towers: str = "replicated"


#: the recipe engines; `plain` (no DeepSpeed, the trainer's fast paths) is every ratio's baseline.
ENGINES: dict[str, Engine] = {
    "plain": Engine(describe="no DeepSpeed: fp32 weights, bf16 autocast, compiled layers, fused loss"),
    "zero2": Engine("zero_stage2_config.json", describe="ZeRO-2 as shipped"),
    "zero3": Engine("zero_stage3_config.json", describe="ZeRO-3 as shipped: bf16 weights, layers eager, fused loss via the head's hooks"),
    "zero3_tuned": Engine("zero_stage3_tuned_config.json",
                          describe="ZeRO-3, layers as leaf modules (one gather each) + compiled layers, fused loss"),
    "zero3_compile": Engine("zero_stage3_tuned_config.json", torch_compile=True,
                            describe="zero3_tuned + Trainer torch_compile (DeepSpeed engine.compile())"),
    "zero3_deepcompile": Engine("zero_stage3_config.json", torch_compile=True, deepcompile=True,
                                describe="shipped ZeRO-3 + DeepCompile (engine.compile() with the z3 passes; cuDNN SDPA off)"),
    "fsdp2": Engine("fsdp2_config.json", fsdp=True,
                    describe="ENGINE=fsdp2: FSDP2 fully_shard per LLM layer, fp32 master, bf16 params + compiled "
                             "layers, fused loss; frozen ViT and projector in bf16, replicated (outside FSDP2)"),
    "fsdp2_towers_sharded": Engine("fsdp2_config.json", fsdp=True, fsdp_frozen_towers="sharded",
                                   describe="fsdp2 with --fsdp_frozen_towers sharded: the frozen towers sharded too "
                                            "(fp32, cast to bf16 at each unshard)"),
}
#: Yi-34B's LLM shape (hidden 7168, GQA 56/8, MLP 20480, vocabulary 64000); layers are a knob (4 -> about 3.2B).
YI_LLM = {"hidden_size": 7168, "num_attention_heads": 56, "num_key_value_heads": 8, "intermediate_size": 20480,
          "vocab_size": 64000, "max_position_embeddings": 4096, "rope_theta": 5000000.0}


def recipe_config(model: str, layers: int | None = None):
    """Config of a recipe model: a preset name (`tiny`, `mid`, ...), or `yi` = the `mid` ViT and projector input with
    Yi-34B's LLM shape at `layers` decoder layers (default 4). `layers` also trims a preset's LLM."""
    if model == "yi":
        config = load_preset("mid")
        for key, value in YI_LLM.items():
            setattr(config.llm_config, key, value)
        config.llm_config.num_hidden_layers = layers or 4
        config.llm_config.head_dim = YI_LLM["hidden_size"] // YI_LLM["num_attention_heads"]
        return config
    config = load_preset(model)
    if layers:
        config.llm_config.num_hidden_layers = layers
    return config


def single_rank_env() -> None:
    """A one-process group for DeepSpeed when no launcher set one (see the module docstring)."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)


def engine_config(name: str, out: Path, fused_adam: bool = False) -> Path | None:
    """The config file engine `name` trains with (None for `plain`): its shipped `src/shell` JSON; for DeepSpeed
    with torch's AdamW unless `fused_adam` (DeepSpeed's own, a CUDA build) and DeepCompile switched on where the
    engine asks for it. Written to `out` so the shipped files stay as they are."""
    engine = ENGINES[name]
    if engine.config is None:
        return None
    config = json.loads((ROOT / "src" / "shell" / engine.config).read_text())
    if not engine.fsdp:
        if not fused_adam:
            config["optimizer"]["params"]["torch_adam"] = True
        if engine.deepcompile:
            config["compile"] = {"deepcompile": True}
    path = out / f"{name}{'_fused' if fused_adam else ''}.json"
    path.write_text(json.dumps(config, indent=1))
    return path


class _Samples(torch.utils.data.Dataset):
    """Samples cut from fixed benchmark batches, in the trainer's sample format (pad_collate puts them back)."""

    def __init__(self, batches: list) -> None:
        self.items = []
        for b in batches:
            for row in range(b.input_ids.shape[0]):
                self.items.append({"input_ids": b.input_ids[row], "labels": b.labels[row],
                                   "pixel_values": b.pixel_values[row : row + 1],
                                   "image_flags": torch.ones(1, dtype=torch.long)})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class StepClock(TrainerCallback):
    """Wall time of the optimizer steps after `warmup` (device synchronised), and the peak memory over them."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.seconds = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()
        elif state.global_step == state.max_steps and self.t0 is not None:
            self._sync()
            self.seconds = time.perf_counter() - self.t0


class StepProfile(TrainerCallback):
    """torch.profiler over the first timed optimizer step (after `warmup`), reduced as the lab's full-step profiles
    are (`train_profile.trace_result`: wall, GPU busy and idle, busy split by kernel kind, top kernels) into the
    report at `path`: what the step's time is made of."""

    def __init__(self, warmup: int, path: Path) -> None:
        self.warmup, self.path = warmup, path
        self.prof = self.marker = None
        self.t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup and self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities)
            self.prof.__enter__()
            self.marker = record_function(f"{STEP_MARKER}#0")
            self.marker.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.marker is not None and state.global_step == self.warmup + 1:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marker.__exit__(None, None, None)
            seconds = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            self.marker = None
            trace_result(self.prof, 1, seconds, args.device, self.path)


@dataclass
class RecipeCase:
    """One timed recipe run: model name, engine (`plain`, `zero2`, `zero3`) and LoRA rank (0 = full LLM)."""

    model: str
    engine: str
    lora: int = 0

    @property
    def name(self) -> str:
        return f"{self.model} {'lora r' + str(self.lora) if self.lora else 'full'} {self.engine}"


def _model_args(lora: int):
    from internvl.train.arguments import ModelArguments

    return ModelArguments(freeze_backbone=True, freeze_mlp=True, freeze_llm=bool(lora),
                          use_llm_lora=lora, lora_dropout=0.0, grad_checkpoint=True)


def build_recipe_model(config, model_args, dtype: torch.dtype):
    """The model as `internvl.train.build.build_model_and_tokenizer` leaves it (frozen towers, LoRA, checkpointing),
    from `config` instead of a preset + tokenizer (the Yi vocabulary has no tokenizer here); plus its FLOPs shape
    (read before LoRA wraps the linears). Random init runs on the GPU when there is one (seconds, not a minute of
    CPU init for 3B weights); the trainer would move it there anyway."""
    from internvl.model import InternVLChatModel
    from internvl.train.build import apply_freezing, enable_gradient_checkpointing, whole_model_construction

    config.llm_config.use_cache = False
    torch.manual_seed(0)
    with whole_model_construction(), torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = InternVLChatModel(config).to(dtype)
    model.img_context_token_id = config.llm_config.vocab_size - 1
    shape = shape_of(model)
    apply_freezing(model, model_args)
    enable_gradient_checkpointing(model)
    return model, shape


def run_recipe_case(case: RecipeCase, config, *, batch: int, seq: int, steps: int, warmup: int, out: Path,
                    bf16: bool, peak_flops: float = H100_H200_BF16_PEAK, fused_adam: bool = False,
                    lr: float = 1e-5, distinct: int | None = None, compile_backend: str = "inductor",
                    profile: bool = False) -> dict:
    """Train `warmup + steps` optimizer steps of `case` with MedRegTrainer; tokens/s and MFU over the last `steps`,
    per-step losses of all of them. `distinct`: how many different batches the steps cycle through (default: a new
    one each step; 1 = the same batch every step, so the losses fall fast, for the CPU test). `compile_backend`: the
    torch.compile backend of the engines with `torch_compile` (the CPU test uses "aot_eager": no C++ build).
    `profile`: write the first timed step's top kernels to `out/profile_<case>.txt` (that step's time then includes
    the profiler's overhead; the tokens/s of a profiled run are not comparable with an unprofiled one)."""
    from internvl.train.arguments import MedRegTrainingArguments
    from internvl.train.cli import release_deepspeed_config, speedups_from_args
    from internvl.train.fsdp import FROZEN_TOWERS, place_frozen_towers
    from accelerate.state import AcceleratorState
    from deepspeed.utils import z3_leaf_module
    from torch.distributed.fsdp import FSDPModule

    from internvl.train.trainer import MedRegTrainer

    cuda = torch.cuda.is_available()
    vocab = config.llm_config.vocab_size
    data = [fixed_batch(batch, seq, vocab=vocab, image_token_id=vocab - 1, num_image_token=config.num_image_token,
                        image_size=config.force_image_size, answer_from=24 + config.num_image_token + 30, seed=i % (distinct or warmup + steps))
            for i in range(warmup + steps)]
    engine = ENGINES[case.engine]
    path = engine_config(case.engine, out, fused_adam)
    ds = str(path) if path is not None and not engine.fsdp else None
    if path is not None:
        single_rank_env()
    with _engine_env():
        args = MedRegTrainingArguments(
            output_dir=str(out / case.name.replace(" ", "_")), max_steps=warmup + steps,
            per_device_train_batch_size=batch, learning_rate=lr, weight_decay=0.0, warmup_steps=0, logging_steps=1,
            save_strategy="no", report_to="none", bf16=bf16, use_cpu=not cuda, seed=0, disable_tqdm=True,
            dataloader_num_workers=0, deepspeed=ds, lr_scheduler_type="constant",
            torch_compile=engine.torch_compile, torch_compile_backend=compile_backend if engine.torch_compile else None,
            fsdp_frozen_towers=engine.fsdp_frozen_towers,
            **({"fsdp": "full_shard", "fsdp_config": str(path)} if engine.fsdp else {}))
        model_args = _model_args(case.lora)
        dtype = torch.bfloat16 if (bf16 and ds) else torch.float32  # as internvl.train.build.build_model_and_tokenizer
        model, shape = build_recipe_model(config, model_args, dtype)
        place_frozen_towers(model, args)  # as medrega-train: under FSDP the frozen towers are replicated by default
        clock = StepClock(warmup)
        trainer = MedRegTrainer(model=model, args=args, train_dataset=_Samples(data),
                                data_collator=_collate, group_by_length=False,
                                fused_lm_loss=model_args.fused_lm_loss, speedups=speedups_from_args(model_args),
                                callbacks=[clock] + ([StepProfile(warmup, out / f"profile_{case.name.replace(' ', '_')}.txt")]
                                                     if profile else []))
        try:
            trainer.train()
        finally:
            release_deepspeed_config(args)
            if engine.fsdp and not cuda:
                AcceleratorState._reset_state(reset_partial_state=True)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    grad_norms = [float(e["grad_norm"]) for e in trainer.state.log_history if "grad_norm" in e]
    timed = data[warmup:]
    flops = sum(recipe_step_flops(shape, tokens=b.real_tokens, supervised=b.supervised, doc_lengths=b.doc_lengths,
                                  images=b.pixel_values.shape[0], lora=lora_params(config, case.lora))
                for b in timed)
    tokens = sum(b.real_tokens for b in timed)
    seconds = clock.seconds or float("nan")
    row = {"case": case.name, "model": case.model, "engine": case.engine, "lora": case.lora, "steps": steps,
           "seconds": seconds, "tokens_per_s": tokens / seconds, "losses": losses, "grad_norms": grad_norms,
           "mfu": mfu(flops, seconds, peak_flops) if clock.seconds else float("nan"),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
           "params": sum(p.numel() for p in model.parameters()),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "z3_leaf_layers": sum(z3_leaf_module(m) for m in model.modules()),
           "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
           "sharded_tensors": sum(isinstance(p, DTensor) for p in model.parameters()),
           "tensors": sum(1 for _ in model.parameters()),
           "tower_dtypes": sorted({str(p.dtype) for n in FROZEN_TOWERS for p in getattr(model, n).parameters()}),
           "fused_head": trainer._fused_head() is not None}
    _release(trainer)
    trainer = model = None
    # dynamo's caches go too: a whole-model compile's guards hold this model, and a layer class seen before at other
    # sizes would be recompiled with dynamic shapes (each case compiles static shapes, from inductor's cache if any)
    free(reset_compiled=True)
    return row


@contextlib.contextmanager
def _engine_env():
    """Undo the process environment a case's TrainingArguments set (`torch_compile` exports ACCELERATE_DYNAMO_*,
    FSDP exports FSDP_CPU_RAM_EFFICIENT_LOADING): the next case's accelerator would otherwise read them."""
    keys = ("ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_DYNAMO_MODE", "ACCELERATE_USE_FSDP",
            "FSDP_CPU_RAM_EFFICIENT_LOADING", "ACCELERATE_USE_DEEPSPEED")
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _release(trainer) -> None:
    """Drop what the Trainer's accelerator (and a DeepSpeed engine) still hold of this case's model and optimizer,
    so the next case starts with the device memory free."""
    engine = getattr(trainer, "model_wrapped", None)
    model = trainer.model
    for opt in (getattr(engine, "optimizer", None), trainer.optimizer):
        _empty_tensors(opt)
    if hasattr(engine, "destroy"):
        engine.destroy()
        for name in ("optimizer", "basic_optimizer", "lr_scheduler"):
            if hasattr(engine, name):
                setattr(engine, name, None)
    trainer.accelerator.free_memory()
    # ZeRO-3's hooks keep the module object alive past this case: free its tensors' storage in place
    for p in list(model.parameters()) + list(model.buffers()):
        p.grad = None
        if isinstance(p, DTensor):  # FSDP2's sharded parameters: freed with the module (no global hooks hold it)
            continue
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        if getattr(p, "ds_tensor", None) is not None:
            p.ds_tensor.data = torch.empty(0, dtype=p.ds_tensor.dtype, device=p.ds_tensor.device)
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None


def _collate(features: list[dict]) -> dict:
    from internvl.data.collate import pad_collate

    return pad_collate(features, pad_token_id=0)


def _empty(t: torch.Tensor) -> None:
    t.data = torch.empty(0, dtype=t.dtype, device=t.device)


def _empty_tensors(obj: Any, depth: int = 0) -> None:
    """Free in place the storage of the tensors an optimizer (DeepSpeed's ZeRO wrapper or torch's) holds in its
    attributes, lists, dicts and per-parameter state, two levels deep (the inner torch optimizer)."""
    if obj is None or depth > 2:
        return
    state = getattr(obj, "state", None)
    if isinstance(state, dict):
        for per_param in state.values():
            for t in (per_param.values() if isinstance(per_param, dict) else []):
                if isinstance(t, torch.Tensor):
                    _empty(t)
        state.clear()
    for value in list(getattr(obj, "__dict__", {}).values()):
        items = value if isinstance(value, (list, tuple)) else value.values() if isinstance(value, dict) else [value]
        for item in items:
            for t in (item if isinstance(item, (list, tuple)) else [item]):
                if isinstance(t, torch.Tensor):
                    _empty(t)
        if isinstance(value, torch.optim.Optimizer):
            _empty_tensors(value, depth + 1)


def recipe_cases(models: list[str], engines: list[str], loras: list[int]) -> list[RecipeCase]:
    """Every (model, LoRA, engine); the no-DeepSpeed baseline first in each group (the ratios' reference), the other
    engines in the order given. Unknown engine names are an error naming the known ones."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise ValueError(f"unknown recipe engine(s) {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    order = sorted(dict.fromkeys(engines), key=lambda e: e != "plain")
    return [RecipeCase(m, e, r) for m in models for r in loras for e in order]


def run_recipe(models: list[str], *, engines: list[str] = list(ENGINES), loras: list[int] = (0, 16),
               layers: int | None = None, batch: int = 4, seq: int = 2048, steps: int = 4, warmup: int = 2,
               bf16: bool = True, out: Path | None = None, fused_adam: bool = False,
               peak_flops: float = H100_H200_BF16_PEAK, lr: float = 1e-5, distinct: int | None = None,
               deadline_s: float | None = None, on_row=None, compile_backend: str = "inductor",
               profile: bool = False) -> list[dict]:
    """Run every recipe case (errors recorded in the row, the run goes on; cases that would start after
    `deadline_s` are recorded as skipped); `vs_plain` = tokens/s over the no-DeepSpeed case of the same model and
    LoRA setting from this same call."""
    deadline = Deadline(deadline_s)
    out = Path(out or tempfile.mkdtemp(prefix="recipe_"))
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for case in recipe_cases(models, engines, list(loras)):
        if deadline.over():
            rows.append({"case": case.name, "model": case.model, "engine": case.engine, "lora": case.lora,
                         "error": f"skipped: deadline ({deadline.elapsed():.0f} s)"})
            continue
        config = recipe_config(case.model, layers)
        try:
            row = run_recipe_case(case, config, batch=batch, seq=seq, steps=steps, warmup=warmup, out=out,
                                  bf16=bf16, fused_adam=fused_adam, peak_flops=peak_flops, lr=lr, distinct=distinct,
                                  compile_backend=compile_backend, profile=profile)
        except Exception as exc:  # noqa: BLE001 - a failed case is a result; the others still run
            row = {"case": case.name, "model": case.model, "engine": case.engine, "lora": case.lora,
                   "error": f"{type(exc).__name__}: {exc}"[:400]}
            logger.exception("recipe case %s failed", case.name)
            free(reset_compiled=True)
        base = next((r for r in rows if r["model"] == case.model and r["lora"] == case.lora
                     and r["engine"] == "plain" and "tokens_per_s" in r), None)
        if base and "tokens_per_s" in row:
            row["vs_plain"] = row["tokens_per_s"] / base["tokens_per_s"]
            pairs = list(zip(row["losses"], base["losses"]))
            row["loss_rel_vs_plain"] = max((abs(a - b) / max(abs(b), 1e-12) for a, b in pairs), default=float("nan"))
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def recipe_table_lines(rows: list[dict], *, batch: int, seq: int, fused_adam: bool = False) -> list[str]:
    """The printed block: one row per case, ratio against the no-DeepSpeed baseline of the same run."""
    if not rows:
        return []
    adam = "DeepSpeed fused Adam" if fused_adam else "+ torch AdamW"
    lines = [f"\n== recipe (frozen ViT + projector, ckpt on, {batch} x {seq} tokens, bf16; DeepSpeed configs {adam}; "
             f"MFU: lab/bench/flops.py recipe_step_flops) ==",
             *(f"  {name}: {ENGINES[name].describe}" for name in dict.fromkeys(r["engine"] for r in rows)
               if name in ENGINES),
             f"{'case':26s} {'tok/s':>9s} {'MFU':>6s} {'peakGiB':>8s} {'vs plain':>8s} {'params':>8s} {'train':>8s} "
             f"{'loss rel':>9s}"]
    for r in rows:
        if "error" in r:
            tag = "" if r["error"].startswith("skipped") else "FAILED "
            lines.append(f"{r['case']:26s} {tag}{r['error']}")
            continue
        vs = f"{r['vs_plain']:.2f}x" if "vs_plain" in r else ""
        lines.append(f"{r['case']:26s} {r['tokens_per_s']:9.0f} {r['mfu'] * 100:5.1f}% {r['peak_mem_gib']:8.1f} "
                     f"{vs:>8s} {r['params'] / 1e6:7.0f}M {r['trainable'] / 1e6:7.1f}M "
                     f"{r.get('loss_rel_vs_plain', float('nan')):9.1e}")
    return lines
