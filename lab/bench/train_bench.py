"""Training-step benchmark: our model with the trainer's fast paths (variants side by side) vs transformers' native
InternVL, gradient checkpointing off and on; a torch.profiler view of a step; packing vs padding (in cli.py).

"Ours" runs exactly what `medrega-train` runs on CUDA: `internvl.train.build.enable_gradient_checkpointing`,
`internvl.ops.train_speedups.apply_train_speedups` and the trainer's loss forward `fused_loss_forward`. A plain loop:
forward, backward, fused AdamW step (lr 1e-5), everything trainable.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from internvl.constants import IGNORE_INDEX
from internvl.model import InternVLChatModel
from internvl.ops.cross_entropy import empty_loss, supervised_rows
from internvl.ops.train_speedups import TrainSpeedups, apply_train_speedups, fused_loss_forward, remove_train_speedups
from lab.ckpt_outside import OutsideCkpt, compile_outside
from lab.fast_kernels import disable_fast_kernels, enable_outside_compiled
from lab.graph_step import CudaGraphTrainStep

from .batches import Batch
from .build import build_native, build_ours
from .flops import ModelShape, mfu, shape_of, train_step_flops
from .runtime import Deadline, free, guard
from .train_profile import bench_optimizer, profile_case, profile_full_step, summary_line

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class LossSpeedups(TrainSpeedups):
    """`TrainSpeedups` with the kernel of the fused LM-head loss pinned: a `linear_cross_entropy` impl, or "liger"
    (session 1's loss, `liger_causal_lm_loss`). The trainer itself always runs "auto". `fast_kernels`: liger's
    RMSNorm / SwiGLU / RoPE kernels on the modules outside compiled layers (`lab.fast_kernels`; CUDA only)."""

    lm_loss_impl: str = "auto"
    fast_kernels: bool = False


def loss_impl(opts: TrainSpeedups) -> str:
    """The LM-head loss kernel a variant runs ("auto" unless it pins one)."""
    return getattr(opts, "lm_loss_impl", "auto")


#: variant name -> (speedups, description). "default" is the trainer's default (`TrainSpeedups()`).
TRAIN_VARIANTS: dict[str, tuple[TrainSpeedups, str]] = {
    "s1": (LossSpeedups(compile_layers=False, fuse_projections=False, lm_loss_impl="liger", fast_kernels=True),
           "session 1: liger RMSNorm/SwiGLU/RoPE + liger fused linear CE"),
    "padded": (LossSpeedups(compile_layers=False, fuse_projections=False, lm_loss_impl="padded", fast_kernels=True),
               "liger kernels + padded-vocab CE"),
    "compiled": (TrainSpeedups(fuse_projections=False), "compiled layers + padded-vocab CE"),
    "default": (TrainSpeedups(), "compiled layers + fused q/k/v, gate/up + padded-vocab CE (trainer default)"),
    "outside": (OutsideCkpt(), "default, checkpoint wrapped around the compiled layer (`lab.ckpt_outside`)"),
    "skip2": (TrainSpeedups(ckpt_skip_llm_layers=2), "default, last 2 LLM layers not checkpointed"),
    "skip4": (TrainSpeedups(ckpt_skip_llm_layers=4), "default, last 4 LLM layers not checkpointed"),
    "graphs": (TrainSpeedups(compile_mode="reduce-overhead"), "default, layers replayed as CUDA graphs (host-bound "
               "steps: the training profile showed the GPU idle a third of the step)"),
    "maxtune": (TrainSpeedups(compile_mode="max-autotune-no-cudagraphs"), "default, inductor max-autotune GEMMs"),
    "graphstep": (TrainSpeedups(), "default, the whole step (forward, loss, backward, AdamW) replayed as one CUDA "
                  "graph (`lab.graph_step.CudaGraphTrainStep`)"),
    "graphstep+cdt": (TrainSpeedups(compile_options={"coordinate_descent_tuning": True}),
                      "graphstep, inductor's coordinate-descent tuning of the layers' fused kernels"),
}
#: variants whose loop is `CudaGraphTrainStep` instead of loss / backward / step.
GRAPH_STEP_VARIANTS = frozenset({"graphstep", "graphstep+cdt"})


def parse_train_variants(text: str) -> list[tuple[str, tuple[bool, ...]]]:
    """"s1,default,skip2:on" -> [(name, checkpointing settings)]; ":on"/":off" restricts a variant to one setting."""
    out = []
    for item in [x.strip() for x in text.split(",") if x.strip()]:
        name, _, which = item.partition(":")
        if name not in TRAIN_VARIANTS:
            raise ValueError(f"unknown training variant {name!r}; known: {', '.join(TRAIN_VARIANTS)}")
        if which not in ("", "on", "off"):
            raise ValueError(f"{item!r}: the checkpointing suffix must be :on or :off")
        out.append((name, (False, True) if not which else ((which == "on"),)))
    return out


def case_name(variant: str, ckpt: bool) -> str:
    """Row name of a case: "ours ckpt=on" for the trainer default, "ours[s1] ckpt=on" for the others."""
    tag = "" if variant == "default" else f"[{variant}]"
    return f"ours{tag} ckpt={'on' if ckpt else 'off'}"


def batch_inputs(b: Batch) -> dict:
    """The model inputs the trainer would pass (everything but the labels)."""
    flags = torch.ones(b.pixel_values.shape[0], dtype=torch.long, device=b.input_ids.device)
    return {"pixel_values": b.pixel_values, "input_ids": b.input_ids, "attention_mask": b.attention_mask,
            "position_ids": b.position_ids, "image_flags": flags}


def liger_causal_lm_loss(hidden_states: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor, *,
                         loss_weight: None = None, num_items_in_batch: None = None, impl: str = "liger") -> torch.Tensor:
    """Session 1's loss (variant `s1`), as `fused_loss_forward`'s `loss_fn`: liger-kernel's fused linear
    cross-entropy over the supervised next-token rows, their mean (no token weights or step divisor)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    if loss_weight is not None or num_items_in_batch is not None:
        raise ValueError("the liger loss takes no token weights and no step divisor")
    rows, targets, _ = supervised_rows(hidden_states, labels)
    if rows.shape[0] == 0:
        return empty_loss(hidden_states, lm_head)
    loss = LigerFusedLinearCrossEntropyFunction.apply(rows, lm_head.weight, targets, lm_head.bias, None, IGNORE_INDEX)
    return loss[0] if isinstance(loss, tuple) else loss


def ours_loss(model, b: Batch, *, fast: bool, impl: str = "auto") -> torch.Tensor:
    """Loss of our model on a batch: `fast` = the trainer's fused loss forward (`fused_loss_forward`, LM head + CE
    on supervised positions only, kernel `impl`), else the model's own full-logits loss."""
    if fast:
        if impl == "liger" and b.input_ids.is_cuda:
            return fused_loss_forward(model, batch_inputs(b), b.labels, loss_fn=liger_causal_lm_loss)[0]
        impl = "chunked" if impl == "liger" else impl  # CPU smoke tests: liger needs CUDA
        return fused_loss_forward(model, batch_inputs(b), b.labels, impl=impl)[0]
    return model(**batch_inputs(b), labels=b.labels).loss


def native_loss(model, b: Batch) -> torch.Tensor:
    """Loss of transformers' InternVLForConditionalGeneration (its own ForCausalLMLoss over full logits)."""
    return model(input_ids=b.input_ids, pixel_values=b.pixel_values, attention_mask=b.attention_mask,
                 position_ids=b.position_ids, labels=b.labels).loss


def set_fast(model, fast: bool, speedups: TrainSpeedups | None = None) -> dict | None:
    """Turn the trainer's fast paths (`speedups`, default: the trainer default) on or off on our model instance, and
    the lab's liger kernels where `speedups` asks for them (their counts in the report's "fast_kernels"). On the CPU
    (smoke tests) the layers are compiled with backend "aot_eager" so the plumbing still runs."""
    remove_train_speedups(model)
    disable_fast_kernels(model)
    if not fast:
        return None
    opts = speedups or TrainSpeedups()
    cpu = next(model.parameters()).device.type != "cuda"
    if cpu:
        opts = dataclasses.replace(opts, backend="aot_eager")
    report = apply_train_speedups(model, opts, allow_cpu=cpu)
    if isinstance(opts, OutsideCkpt):
        compile_outside(model, opts)
    if getattr(opts, "fast_kernels", False):
        report["fast_kernels"] = enable_outside_compiled(model)
    return report


def set_checkpointing(model, on: bool) -> None:
    """Our model: the trainer's `enable_gradient_checkpointing` (LLM + ViT, non-reentrant); native: HF's own."""
    if on:
        if hasattr(model, "vision_model") and hasattr(model, "mlp1"):
            # imported here: internvl.train.build imports peft (and through it bitsandbytes), which only this needs
            from internvl.train.build import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        off = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        off()


def graph_step_batch(b: Batch) -> dict:
    """A benchmark batch as `CudaGraphTrainStep` takes it (the model inputs plus labels)."""
    return {**batch_inputs(b), "labels": b.labels}


def profile_graph_step_case(model, batches: list[Batch], path: Path, *, impl: str = "auto") -> dict:
    """`profile_full_step` of `CudaGraphTrainStep` replays (a fresh capturable AdamW and step object; its eager steps
    and the capture are the unprofiled warm-up)."""
    opt = bench_optimizer(model, capturable=True)
    stepper = CudaGraphTrainStep(model, opt, impl=impl)
    try:
        return profile_full_step(model, None, batches, opt, path, warmup=stepper.eager_steps + 1,
                                 step_fn=lambda i: stepper(graph_step_batch(batches[i % len(batches)])))
    finally:
        stepper = opt = None  # drop the graph, its pool and the optimizer state
        model.zero_grad(set_to_none=True)


def run_train_case(name: str, model, loss_fn, batches: list[Batch], *, shape: ModelShape, steps: int, warmup: int,
                   ckpt: bool, peak_flops: float, prepare=None, graph_step: bool = False, impl: str = "auto") -> dict:
    """Time `steps` optimizer steps (after `warmup`, which also pays any compile) cycling over `batches`.

    `prepare(model)` runs after checkpointing is configured (the trainer's order: checkpointing, then fast paths).
    `graph_step`: the steps are `CudaGraphTrainStep(model, AdamW(capturable=True), impl=impl)` calls (`loss_fn` unused);
    its eager steps and the capture fall in the warm-up, and the peak memory covers them (the replays allocate
    nothing).
    """
    set_checkpointing(model, ckpt)
    prepared = prepare(model) if prepare is not None else None
    model.train()
    cuda = next(model.parameters()).is_cuda
    opt = bench_optimizer(model, capturable=graph_step)
    stepper = CudaGraphTrainStep(model, opt, impl=impl) if graph_step else None

    def one_step(b: Batch) -> torch.Tensor:
        if stepper is not None:
            return stepper(graph_step_batch(b))
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA-graph trees (no-op without them)
        loss = loss_fn(model, b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if cuda and graph_step:
        torch.cuda.reset_peak_memory_stats()
    losses: list[torch.Tensor] = []
    t_warm = time.perf_counter()
    for i in range(max(warmup, stepper.eager_steps + 1 if stepper is not None else 0)):
        one_step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
        if not graph_step:
            torch.cuda.reset_peak_memory_stats()
    warm_seconds = time.perf_counter() - t_warm
    tokens = samples = supervised = 0
    flops = 0.0
    t0 = time.perf_counter()
    for i in range(steps):
        b = batches[(warmup + i) % len(batches)]
        losses.append(one_step(b))
        tokens += b.real_tokens
        samples += len(b.doc_lengths)
        supervised += b.supervised
        flops += train_step_flops(shape, tokens=b.real_tokens, supervised=b.supervised, doc_lengths=b.doc_lengths,
                                  images=b.pixel_values.shape[0])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    # CUDA-graph pools are allocated while recording (in the warm-up) and only replayed here, so they show in the
    # reserved memory, not in the timed steps' allocation peak
    reserved = torch.cuda.memory_reserved() / 2**30 if cuda else float("nan")
    graph_steps = dict(stepper.steps) if stepper is not None else None
    stepper = opt = None  # free the optimizer state (and any captured graph) before the next case
    model.zero_grad(set_to_none=True)
    return {
        "case": name,
        "ckpt": ckpt,
        "steps": steps,
        "seconds": seconds,
        "ms_per_step": seconds / max(steps, 1) * 1e3,
        "warmup_seconds": warm_seconds,
        "tokens_per_s": tokens / seconds,
        "samples_per_s": samples / seconds,
        "useful_tokens_per_s": tokens / seconds,
        "peak_mem_gib": peak,
        "reserved_gib": reserved,
        "mfu": mfu(flops, seconds, peak_flops),
        "tflops_per_s": flops / seconds / 1e12,
        "loss_last": float(losses[-1]) if losses else float("nan"),
        **({"applied": prepared} if prepared is not None else {}),
        **({"graph_steps": graph_steps} if graph_steps is not None else {}),
    }


def loss_agreement(model, batch: Batch, speedups: TrainSpeedups | None = None) -> dict:
    """Guard on the device: the trainer's fast loss (fast paths of `speedups` on) vs the plain eager full-logits
    loss, same batch and weights, training mode (so the compiled training graphs are the ones checked)."""
    model.train()
    set_checkpointing(model, False)
    with torch.no_grad():
        set_fast(model, False)
        plain = float(ours_loss(model, batch, fast=False))
    report = set_fast(model, True, speedups)
    opts = speedups or TrainSpeedups()
    fast = ours_loss(model, batch, fast=True, impl=loss_impl(opts)).item()  # with grad: the training graph
    model.zero_grad(set_to_none=True)
    return {"plain": plain, "fast": fast, "rel_diff": abs(fast - plain) / max(abs(plain), 1e-12),
            "applied": report}


def profile_step(model, loss_fn, batch: Batch, path: Path, *, rows: int = 22) -> dict:
    """One warm training step (forward + backward) under torch.profiler: wall time, summed self CPU time of all ops,
    summed self CUDA kernel time, and the top ops by CUDA time (written to `path`)."""
    cuda = batch.input_ids.is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(2):
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        loss_fn(model, batch).backward()
        sync()
        wall = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    events = prof.key_averages()
    cpu_us = sum(e.self_cpu_time_total for e in events)
    # kernel time once: the device events themselves (their launching ops carry the same time again)
    device_events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    cuda_us = sum(getattr(e, "self_device_time_total", 0) for e in device_events)
    table = events.table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=rows,
                         max_name_column_width=60)
    summary = {"wall_ms": wall * 1e3, "self_cpu_ms": cpu_us / 1e3, "self_cuda_ms": cuda_us / 1e3,
               "kernels": sum(e.count for e in device_events)}
    path.write_text(f"{json.dumps(summary)}\n{table}")
    return summary


def section_train(args, res: dict, config, *, batches_for) -> None:
    """Native (checkpointing off/on), then our model with each `args.train_variants` side by side; profiles of the
    checkpointing-on step (`args.train_profile`: native, s1, default); full optimizer-step profiles of the
    checkpointing-off cases (`args.train_profile_full`: native and the default variant, `train_profile.py`) after
    their timed runs, in res["train_full_profiles"]; JSON saved after every case."""
    vocab = config.llm_config.vocab_size
    img_id = vocab - 1
    data = batches_for(vocab, img_id)
    rows = res.setdefault("train", [])
    skipped = res.setdefault("train_skipped", [])
    deadline = Deadline(getattr(args, "train_deadline_s", None))
    out = Path(args.out)
    save = lambda: (out / "bench.json").write_text(json.dumps(res, indent=1, default=str))
    profiles = res.setdefault("train_profiles", {})
    do_profile = bool(getattr(args, "train_profile", False))
    full_profiles = res.setdefault("train_full_profiles", {})
    do_full = bool(getattr(args, "train_profile_full", False))
    variants = parse_train_variants(getattr(args, "train_variants", "default"))

    native, _ = build_native(config, image_token_id=img_id, device=args.device, dtype=args.dtype, seed=0)
    for ckpt in (False, True):
        r = guard(res, f"native ckpt={ckpt}", run_train_case, f"native ckpt={'on' if ckpt else 'off'}", native,
                 native_loss, data, shape=shape_of_native(config, args), steps=args.steps, warmup=args.warmup,
                 ckpt=ckpt, peak_flops=args.peak)
        if r:
            rows.append(r)
            if do_full and not ckpt:  # same model, checkpointing still off after the timed case
                full_profiles[r["case"]] = guard(res, f"full profile {r['case']}", profile_case, native, native_loss,
                                                 data, out / "profile_full_native_ckpt_off.txt")
        save()
    if do_profile:
        set_checkpointing(native, True)
        profiles["native ckpt=on"] = guard(res, "profile native", profile_step, native, native_loss, data[0],
                                          out / "profile_train_native_ckpt_on.txt")
    native = None
    free()

    ours = build_ours(config, device=args.device, dtype=args.dtype, seed=0)
    ours.img_context_token_id = img_id
    shape = shape_of(ours)
    res["shape"] = shape.as_dict()
    res["loss_guard"] = guard(res, "loss_guard", loss_agreement, ours, data[0])
    save()
    for variant, ckpts in variants:
        opts, _ = TRAIN_VARIANTS[variant]
        for ckpt in ckpts:
            name = case_name(variant, ckpt)
            if deadline.over():
                skipped.append(name)
                continue
            r = guard(res, name, run_train_case, name, ours,
                     lambda m, b, impl=loss_impl(opts): ours_loss(m, b, fast=True, impl=impl), data, shape=shape,
                     steps=args.steps, warmup=args.warmup, ckpt=ckpt, peak_flops=args.peak,
                     prepare=lambda m, o=opts: set_fast(m, True, o), graph_step=variant in GRAPH_STEP_VARIANTS,
                     impl=loss_impl(opts))
            if r:
                r["variant"] = variant
                rows.append(r)
                if do_full and not ckpt and variant in GRAPH_STEP_VARIANTS and not deadline.over():
                    full_profiles[name] = guard(res, f"full profile {name}", profile_graph_step_case, ours, data,
                                                out / f"profile_full_{variant.replace('+', '_')}_ckpt_off.txt",
                                                impl=loss_impl(opts))
                if do_full and not ckpt and variant in ("default", "graphs") and not deadline.over():
                    # the timed configuration as it stands: checkpointing off, the fast paths still applied
                    loss = lambda m, b, impl=loss_impl(opts): ours_loss(m, b, fast=True, impl=impl)
                    full_profiles[name] = guard(res, f"full profile {name}", profile_case, ours, loss, data,
                                                out / f"profile_full_{variant}_ckpt_off.txt")
            if do_profile and ckpt and variant in ("s1", "default") and not deadline.over():
                profiles[name] = guard(res, f"profile {name}", profile_step, ours,
                                      lambda m, b, impl=loss_impl(opts): ours_loss(m, b, fast=True, impl=impl),
                                      data[0], out / f"profile_train_{variant}_ckpt_on.txt")
            save()
    set_fast(ours, False)
    ours = None
    free()


def shape_of_native(config, args) -> ModelShape:
    """FLOPs shape for the native runs (the same sizes as ours; built on the meta device, no memory)."""
    with torch.device("meta"):
        return shape_of(InternVLChatModel(config))


def train_table_lines(res: dict) -> list[str]:
    """The training block of the printed table: one row per case, ratio against native with the same checkpointing
    and against session 1's ours (`s1`)."""
    train = res.get("train", [])
    if not train:
        return []
    args = res["args"]
    header = (f"{'case':26s} {'tok/s':>9s} {'ms/step':>8s} {'peakGiB':>8s} {'resvGiB':>8s} {'MFU':>6s} "
              f"{'vs native':>9s} {'vs s1':>6s} {'warm s':>7s}")
    lines = [f"\n== training (batch {args['batch']} x {args['seq']} tokens, 1 image each, bf16, AdamW) ==", header]
    by = {r["case"]: r for r in train}
    for r in train:
        on = "on" if r["ckpt"] else "off"
        nat, s1 = by.get(f"native ckpt={on}"), by.get(f"ours[s1] ckpt={on}")
        ours = r["case"].startswith("ours")
        vs_nat = f"{r['tokens_per_s'] / nat['tokens_per_s']:.2f}x" if ours and nat else ""
        vs_s1 = f"{r['tokens_per_s'] / s1['tokens_per_s']:.2f}x" if ours and s1 and s1 is not r else ""
        lines.append(f"{r['case']:26s} {r['tokens_per_s']:9.0f} {r.get('ms_per_step', float('nan')):8.1f} "
                     f"{r['peak_mem_gib']:8.1f} {r.get('reserved_gib', float('nan')):8.1f} {r['mfu'] * 100:5.1f}% "
                     f"{vs_nat:>9s} {vs_s1:>6s} {r.get('warmup_seconds', float('nan')):7.1f}")
    for name, p in (res.get("train_profiles") or {}).items():
        if p:
            lines.append(f"profile {name}: wall {p['wall_ms']:.1f} ms, self CPU {p['self_cpu_ms']:.1f} ms, "
                         f"self CUDA {p['self_cuda_ms']:.1f} ms")
    for name, p in (res.get("train_full_profiles") or {}).items():
        if p:
            lines.append(summary_line(name, p, by.get(name, {}).get("ms_per_step")))
    if res.get("train_skipped"):
        lines.append("skipped (deadline): " + ", ".join(res["train_skipped"]))
    return lines
