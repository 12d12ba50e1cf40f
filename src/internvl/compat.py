"""Every use of a private transformers / DeepSpeed internal, in one place, checked against the supported versions.

The toolkit otherwise uses public APIs only. What is left here has no public equivalent (checked against
transformers 5.25): each function names the internal it touches and why no public API serves, and when a future
version lacks it the error says which installed version broke which internal, instead of an AttributeError deep inside
a training step: Trainer's private steps (`trainer_base`), a config's attention implementation, the end of a
Llama-style attention forward (`attend`), the DeepSpeed config transformers holds, per-instance forward swaps, the FSDP
plugin arguments TrainingArguments builds (`keep_out_of_fsdp`), accelerate's distributed state for FSDP on the CPU
(`fsdp_on_cpu`).

Supported: `SUPPORTED` (the range requirements.txt allows). `check_version` raises `CompatError` outside it.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import sys
import types
from collections.abc import Callable
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: the versions of each package this module's internals were checked against (as in requirements.txt / setup.py).
SUPPORTED: dict[str, str] = {"transformers": ">=5.17,<6", "deepspeed": ">=0.15", "accelerate": ">=1.10"}


class CompatError(RuntimeError):
    """An installed transformers / DeepSpeed version lacks an internal this toolkit needs, or is unsupported."""


@functools.cache
def installed_version(package: str) -> str | None:
    """The installed distribution version of `package`, or None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def check_version(package: str, version: str | None = None) -> str:
    """Return the installed version of `package` (or `version`, for tests); raise `CompatError` naming it when it is
    outside `SUPPORTED[package]` or not installed."""
    version = installed_version(package) if version is None else version
    if version is None:
        raise CompatError(f"{package} is not installed; MedRegA supports {package}{SUPPORTED[package]}")
    if Version(version) not in SpecifierSet(SUPPORTED[package]):
        raise CompatError(f"{package} {version} is not supported: MedRegA supports {package}{SUPPORTED[package]} "
                          f"(pip install '{package}{SUPPORTED[package]}')")
    return version


def transformers_at_least(version: str) -> bool:
    """Whether the installed transformers is `version` or newer (e.g. "5.24": the `cache=` attention API and a
    StaticCache that tracks its own length, which the static-cache decoder needs)."""
    return Version(installed_version("transformers")).release >= Version(version).release


def missing(package: str, internal: str) -> CompatError:
    """The error for an internal that the installed `package` lacks (names the version and the supported range)."""
    return CompatError(f"{package} {installed_version(package)} has no {internal}, which MedRegA needs "
                       f"(supported: {package}{SUPPORTED[package]}; see internvl/compat.py)")


def require_attr(owner: Any, name: str, package: str) -> Any:
    """`getattr(owner, name)` after checking the package version; `CompatError` naming both when it is missing."""
    check_version(package)
    if not hasattr(owner, name):
        raise missing(package, f"`{getattr(owner, '__name__', type(owner).__name__)}.{name}`")
    return getattr(owner, name)


# ---- transformers.Trainer's private steps ------------------------------------------------------------------------
#: Trainer's private methods that `trainer_base()` overrides, with the parameters each must take.
TRAINER_PRIVATE_STEPS: dict[str, tuple[str, ...]] = {
    "_get_train_sampler": ("train_dataset",),
    "_get_num_items_in_batch": ("batch_samples", "device"),
    "_get_output_dir": ("trial",),
    "_save_checkpoint": ("model", "trial"),
    "_save": ("output_dir", "state_dict"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_get_grad_norm": ("model", "grad_norm"),
}


def check_trainer_steps(trainer_class: type) -> None:
    """Raise `CompatError` unless `trainer_class` has every private step of `TRAINER_PRIVATE_STEPS` with its
    parameters (transformers renames or removes them between minor versions)."""
    for name, params in TRAINER_PRIVATE_STEPS.items():
        method = require_attr(trainer_class, name, "transformers")
        found = tuple(inspect.signature(method).parameters)[1:]
        if found[:len(params)] != params:
            raise missing("transformers", f"`Trainer.{name}({', '.join(params)})` (found {name}({', '.join(found)}))")


@functools.cache
def trainer_base() -> type:
    """transformers' `Trainer` subclassed so that its private steps call public-named hooks, which `MedRegTrainer`
    overrides (each hook gets `default`, the Trainer's own step), plus `run_dir(trial)` (Trainer's output folder):

    train_sampler(dataset, default), step_loss_items(batch_samples, device, default), checkpoint_dir(trial, default),
    save_checkpoint(model, trial, default), save_model_files(output_dir, state_dict, default),
    load_checkpoint_weights(resume_from_checkpoint, model, default), step_grad_norm(model, grad_norm, default) (the
    gradient norm of each optimizer step, after clipping, before the optimizer step), and `running_loss()` (Trainer's
    on-device sum of the losses since the last log).

    The import is lazy because transformers' Trainer takes about 2 s to import and only training needs it.
    """
    from transformers import Trainer

    check_trainer_steps(Trainer)

    class HookedTrainer(Trainer):
        """Trainer whose private steps are reached through the public-named hooks above (defaults: Trainer's)."""

        def run_dir(self, trial) -> str:
            """Trainer's own output folder for `trial` (before `checkpoint_dir` redirects it)."""
            return Trainer._get_output_dir(self, trial)

        def train_sampler(self, dataset, default: Callable):
            return default(dataset)

        def step_loss_items(self, batch_samples: list, device, default: Callable):
            return default(batch_samples, device)

        def checkpoint_dir(self, trial, default: Callable) -> str:
            return default(trial)

        def save_checkpoint(self, model: nn.Module, trial, default: Callable) -> None:
            default(model, trial)

        def save_model_files(self, output_dir: str | None, state_dict: dict | None, default: Callable) -> None:
            default(output_dir, state_dict=state_dict)

        def load_checkpoint_weights(self, resume_from_checkpoint: str, model: nn.Module | None,
                                    default: Callable) -> None:
            default(resume_from_checkpoint, model)

        def step_grad_norm(self, model: nn.Module, grad_norm, default: Callable):
            return default(model, grad_norm=grad_norm)

        def running_loss(self):
            """Trainer's running loss tensor (`_tr_loss`), or None before training starts."""
            return getattr(self, "_tr_loss", None)

        def _get_train_sampler(self, train_dataset=None):
            return self.train_sampler(train_dataset, super()._get_train_sampler)

        def _get_num_items_in_batch(self, batch_samples, device):
            return self.step_loss_items(batch_samples, device, super()._get_num_items_in_batch)

        def _get_output_dir(self, trial):
            return self.checkpoint_dir(trial, super()._get_output_dir)

        def _save_checkpoint(self, model, trial):
            return self.save_checkpoint(model, trial, super()._save_checkpoint)

        def _save(self, output_dir=None, state_dict=None):
            return self.save_model_files(output_dir, state_dict, super()._save)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            return self.load_checkpoint_weights(resume_from_checkpoint, model, super()._load_from_checkpoint)

        def _get_grad_norm(self, model, grad_norm=None):
            return self.step_grad_norm(model, grad_norm, super()._get_grad_norm)

    return HookedTrainer


# ---- attention implementation --------------------------------------------------------------------------------
_MISSING = object()


def attn_implementation(config: Any) -> str | None:
    """The attention implementation a transformers config selects (`config._attn_implementation`; a model's public
    `set_attn_implementation` validates and reloads kernels: too slow per generate call, and configs have none).

    Runs inside compiled layers (through `attention_function`), so it does no version lookup on the way: only a
    missing attribute leads to `CompatError`."""
    name = getattr(config, "_attn_implementation", _MISSING)
    if name is _MISSING:
        raise missing("transformers", "`PreTrainedConfig._attn_implementation`")
    return name


def set_attn_implementation(config: Any, value: str | None) -> None:
    """Set `config._attn_implementation` (before the model is built, or around a decode call)."""
    attn_implementation(config)
    config._attn_implementation = value


def attention_function(module: nn.Module) -> Callable:
    """The attention kernel that `module.config` selects: transformers' public `ALL_ATTENTION_FUNCTIONS` entry, or the
    `eager_attention_forward` of the module's own modeling file for "eager" (which that table does not hold)."""
    name = attn_implementation(module.config)
    function = ALL_ATTENTION_FUNCTIONS.get_interface(name, None)
    if function is None:
        function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise missing("transformers", f"an attention function {name!r} for {type(module).__name__}")
    return function


def attend(module: nn.Module, query, key, value, attention_mask, cache, input_shape: tuple[int, ...], **kwargs):
    """The end of transformers' Llama-style attention forward (the `cache=` API of transformers >= 5.24) after the
    q/k/v projections and RoPE, for the forwards that replace it (fused projections, liger RoPE): cache update, the
    configured attention kernel, output projection. Returns (output, attention weights)."""
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    out, weights = attention_function(module)(module, query, key, value, attention_mask,
                                              dropout=0.0 if not module.training else module.attention_dropout,
                                              scaling=module.scaling, **kwargs)
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def attend_rope(module: nn.Module, qkv, rope: Callable, position_embeddings, attention_mask, cache, **kwargs):
    """`attend` from the q/k/v projection outputs [..., heads * head_dim]: split into heads, RoPE by
    `rope(query, key, cos, sin)`, then cache update, attention kernel and output projection."""
    input_shape = qkv[0].shape[:-1]
    query, key, value = (t.reshape(*input_shape, -1, module.head_dim).transpose(1, 2) for t in qkv)
    query, key = rope(query, key, *position_embeddings)
    return attend(module, query, key, value, attention_mask, cache, input_shape, **kwargs)


# ---- DeepSpeed configuration held by transformers ----------------------------------------------------------------
def active_hf_deepspeed_config() -> Any | None:
    """The HfDeepSpeedConfig transformers currently holds (weakly), or None; pass it back to the public
    `transformers.integrations.deepspeed.set_hf_deepspeed_config` to restore it (the public `deepspeed_config()`
    gives only its dict, which cannot be put back)."""
    ref = require_attr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", "transformers")
    return ref() if ref is not None else None


# ---- per-instance forward swaps ------------------------------------------------------------------------------------
def swap_forward(module: nn.Module, forward: Callable, flag: str) -> None:
    """Give `module` (one instance) `forward` as its forward and set the attribute `flag` to True, so that
    `restore_forwards(model, flag)` can undo it. Relies on transformers layers dispatching through `self.forward`
    (`GradientCheckpointingLayer.__call__`) and on the attention forward signature (`cache=`), both internal."""
    module.forward = types.MethodType(forward, module)
    setattr(module, flag, True)


def restore_forwards(model: nn.Module, flag: str) -> int:
    """Undo `swap_forward`: every module of `model` whose attribute `flag` is True gets its class forward back (the
    instance attribute is deleted) and the flag cleared. Returns how many were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, flag, False):
            del module.forward
            setattr(module, flag, False)
            restored += 1
    return restored


# ---- the FSDP plugin arguments transformers hands accelerate -------------------------------------------------------
def keep_out_of_fsdp(training_args: Any, modules: list[str], unwrap: set[str]) -> list[str]:
    """Have the Trainer's FSDP plugin leave the top-level modules named `modules` out of FSDP and not wrap the layer
    classes `unwrap`; returns the classes taken off the wrap list.

    `TrainingArguments.__post_init__` (`_process_fsdp_args`) turns `--fsdp_config` into `fsdp_plugin_args`, the
    keyword arguments the Trainer passes to accelerate's `FullyShardedDataParallelPlugin` when it is created (wrap
    classes as one comma-joined `transformer_cls_names_to_wrap` string); the plugin reads `FSDP_IGNORED_MODULES` /
    `FSDP_TRANSFORMER_CLS_TO_WRAP` from the environment only where those arguments are None. Editing the arguments of
    this run (not the environment) keeps the change to this run: a second Trainer in the same process is unaffected.
    `ignored_modules` is a regular expression that accelerate full-matches against module names; one the user gave
    in `FSDP_IGNORED_MODULES` is kept beside ours. `fsdp_config` itself (recorded in run_config.json, fed back to
    repeat a run) is left as given. No public API sets these between the arguments and the Trainer."""
    plugin = require_attr(training_args, "fsdp_plugin_args", "transformers")
    if plugin is None:
        raise ValueError("keep_out_of_fsdp: FSDP is not enabled for this run (no --fsdp)")
    wrap = plugin.get("transformer_cls_names_to_wrap")
    classes = [c for c in wrap.split(",") if c] if isinstance(wrap, str) else list(wrap or [])
    kept = [c for c in classes if c not in unwrap]
    if kept and kept != classes:  # an empty list would make accelerate fall back to the model's own list
        plugin["transformer_cls_names_to_wrap"] = ",".join(kept)
    ours = "|".join(modules)
    given = plugin.get("ignored_modules")
    if given is None:
        given = os.environ.get("FSDP_IGNORED_MODULES") or None
    if given is not None and not isinstance(given, str):
        raise ValueError(f"keep_out_of_fsdp: ignored_modules already holds {type(given).__name__}, not a regex")
    plugin["ignored_modules"] = ours if given in (None, ours) else f"(?:{given})|{ours}"
    return [c for c in classes if c not in kept] if kept else []


def fsdp_on_cpu(trainer: Any) -> None:
    """Make a Trainer built with `--fsdp` and `--use_cpu` really apply FSDP2 (gloo): accelerate enables FSDP only for
    GPU-type distributed setups and, under `use_cpu`, drops the plugin the Trainer built from `--fsdp_config`, so the
    run would silently train the unsharded model. This puts that plugin (with the run's mixed precision) on the
    accelerator's state, so `Accelerator.prepare` runs accelerate's own `fsdp2_prepare_model` (`fully_shard` of the
    wrap policy's layers, the embedding and the [final norm, LM head] tail, then the root) exactly as on CUDA. Call
    after the Trainer is built, before `train()`. Internals: the accelerator state's `fsdp_plugin` /
    `distributed_type`, PartialState's shared state and the Trainer's `is_fsdp_enabled` (no public switch exists).
    The lab resets the state between cases (`AcceleratorState._reset_state(reset_partial_state=True)`)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if getattr(trainer.args, "fsdp_plugin_args", None) is None:
        raise ValueError("fsdp_on_cpu: the Trainer was built without an --fsdp_config")
    state = trainer.accelerator.state
    require_attr(state, "distributed_type", "accelerate")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # every later `AcceleratorState()` copies PartialState's shared state over its own (accelerate does the same when
    # it picks FSDP itself): without this the final save would see MULTI_CPU and write the sharded DTensors
    shared = require_attr(PartialState, "_shared_state", "accelerate")
    shared["distributed_type"] = DistributedType.FSDP
    require_attr(trainer, "is_fsdp_enabled", "transformers")
    trainer.is_fsdp_enabled = True
    if not trainer.accelerator.is_fsdp2:
        raise CompatError(f"fsdp_on_cpu: expected an FSDP2 config, got fsdp_version {plugin.fsdp_version}")
