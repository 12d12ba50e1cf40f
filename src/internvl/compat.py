"""Every use of a private transformers / DeepSpeed / accelerate internal, in one place, checked against `SUPPORTED`.

Each function names the internal it touches (none has a public equivalent in transformers 5.25); a version that lacks
it gives a `CompatError` naming the installed version and the internal, not an AttributeError inside a training step.
"""
from __future__ import annotations

import functools
import importlib.metadata
import inspect
import os
import re
import sys
import types
from collections.abc import Callable
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn
from transformers.integrations import deepspeed as hf_deepspeed
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: the versions this module's internals were checked against (as in requirements.txt / setup.py).
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
    """The installed version of `package` (or `version`, for tests); `CompatError` when missing or unsupported."""
    version = installed_version(package) if version is None else version
    if version is None:
        raise CompatError(f"{package} is not installed; MedRegA supports {package}{SUPPORTED[package]}")
    if Version(version) not in SpecifierSet(SUPPORTED[package]):
        raise CompatError(f"{package} {version} is not supported: MedRegA supports {package}{SUPPORTED[package]} "
                          f"(pip install '{package}{SUPPORTED[package]}')")
    return version


def transformers_at_least(version: str) -> bool:
    """Whether the installed transformers is `version` or newer (e.g. "5.24", the `cache=` attention API)."""
    return Version(installed_version("transformers")).release >= Version(version).release


def missing(package: str, internal: str) -> CompatError:
    """The error for an internal that the installed `package` lacks."""
    return CompatError(f"{package} {installed_version(package)} has no {internal}, which MedRegA needs "
                       f"(supported: {package}{SUPPORTED[package]}; see internvl/compat.py)")


def require_attr(owner: Any, name: str, package: str) -> Any:
    """`getattr(owner, name)` after checking the package version; `CompatError` naming both when it is missing."""
    check_version(package)
    if not hasattr(owner, name):
        raise missing(package, f"`{getattr(owner, '__name__', type(owner).__name__)}.{name}`")
    return getattr(owner, name)


# ---- transformers.Trainer's private steps ------------------------------------------------------------------------
#: Trainer's private steps that `trainer_base()` routes to a public-named hook: private name -> (hook, parameters).
TRAINER_PRIVATE_STEPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "_get_train_sampler": ("train_sampler", ("train_dataset",)),
    "_get_num_items_in_batch": ("step_loss_items", ("batch_samples", "device")),
    "_get_output_dir": ("checkpoint_dir", ("trial",)),
    "_save_checkpoint": ("save_checkpoint", ("model", "trial")),
    "_save": ("save_model_files", ("output_dir", "state_dict")),
    "_load_from_checkpoint": ("load_checkpoint_weights", ("resume_from_checkpoint", "model")),
    "_get_grad_norm": ("step_grad_norm", ("model", "grad_norm")),
}


def check_trainer_steps(trainer_class: type) -> None:
    """Raise `CompatError` unless `trainer_class` has every step of `TRAINER_PRIVATE_STEPS` with its parameters."""
    for name, (_, params) in TRAINER_PRIVATE_STEPS.items():
        method = require_attr(trainer_class, name, "transformers")
        found = tuple(inspect.signature(method).parameters)[1:]
        if found[:len(params)] != params:
            raise missing("transformers", f"`Trainer.{name}({', '.join(params)})` (found {name}({', '.join(found)}))")


def _route(trainer: type, private: str, hook: str, params: tuple[str, ...]) -> Callable:
    """A `private` step that calls `self.<hook>(*params, default)`, `default` being `trainer`'s own step (missing
    parameters are None, the private steps' defaults). An argument it does not know (a newer transformers passing
    more) is a `CompatError`, never dropped."""

    def step(self, *args, **kwargs):
        unknown = sorted(set(kwargs) - set(params)) + [f"positional #{i}" for i in range(len(params), len(args))]
        if unknown:
            raise missing("transformers", f"`Trainer.{private}` as called with {unknown}")
        values = dict(zip(params, args), **kwargs)
        return getattr(self, hook)(*(values.get(p) for p in params), types.MethodType(getattr(trainer, private), self))

    return step


def _call_default(self, *args):
    """A hook's default behaviour: the Trainer's own step (the last argument) on the other arguments."""
    return args[-1](*args[:-1])


@functools.cache
def trainer_base() -> type:
    """transformers' `Trainer` whose private steps call the public-named hooks of `TRAINER_PRIVATE_STEPS`, each as
    `hook(*parameters, default)` with `default` the Trainer's own step (`MedRegTrainer` overrides them); plus
    `run_dir(trial)` (Trainer's own output folder) and `running_loss()` (Trainer's on-device loss sum since the last
    log, or None). Lazy import: Trainer takes about 2 s to import and only training needs it."""
    from transformers import Trainer

    check_trainer_steps(Trainer)
    namespace: dict[str, Any] = {
        "run_dir": lambda self, trial: Trainer._get_output_dir(self, trial),
        "running_loss": lambda self: getattr(self, "_tr_loss", None),
    }
    for private, (hook, params) in TRAINER_PRIVATE_STEPS.items():
        namespace[hook] = _call_default
        namespace[private] = _route(Trainer, private, hook, params)
    return type("HookedTrainer", (Trainer,), namespace)


# ---- attention implementation --------------------------------------------------------------------------------
def attn_implementation(config: Any) -> str | None:
    """`config._attn_implementation` (the public model method reloads kernels: too slow per generate call, and
    configs have none). No version lookup: it runs inside compiled layers."""
    if not hasattr(config, "_attn_implementation"):
        raise missing("transformers", "`PreTrainedConfig._attn_implementation`")
    return config._attn_implementation


def set_attn_implementation(config: Any, value: str | None) -> None:
    """Set `config._attn_implementation` (before the model is built, or around a decode call)."""
    attn_implementation(config)
    config._attn_implementation = value


def attention_function(module: nn.Module) -> Callable:
    """The attention kernel `module.config` selects: the `ALL_ATTENTION_FUNCTIONS` entry, or for "eager" (not in that
    table) the `eager_attention_forward` of the module's own modeling file."""
    name = attn_implementation(module.config)
    function = ALL_ATTENTION_FUNCTIONS.get_interface(name, None)
    if function is None:
        function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise missing("transformers", f"an attention function {name!r} for {type(module).__name__}")
    return function


def attend(module: nn.Module, query, key, value, attention_mask, cache, input_shape: tuple[int, ...], **kwargs):
    """The end of transformers' Llama-style attention forward (`cache=` API, >= 5.24) after q/k/v and RoPE, for the
    forwards that replace it: cache update, attention kernel, output projection -> (output, weights)."""
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    out, weights = attention_function(module)(module, query, key, value, attention_mask,
                                              dropout=0.0 if not module.training else module.attention_dropout,
                                              scaling=module.scaling, **kwargs)
    return module.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


def attend_rope(module: nn.Module, qkv, rope: Callable, position_embeddings, attention_mask, cache, **kwargs):
    """`attend` from the q/k/v projection outputs [..., heads * head_dim], RoPE by `rope(query, key, cos, sin)`."""
    input_shape = qkv[0].shape[:-1]
    query, key, value = (t.reshape(*input_shape, -1, module.head_dim).transpose(1, 2) for t in qkv)
    query, key = rope(query, key, *position_embeddings)
    return attend(module, query, key, value, attention_mask, cache, input_shape, **kwargs)


# ---- DeepSpeed configuration held by transformers ----------------------------------------------------------------
def active_hf_deepspeed_config() -> Any | None:
    """The HfDeepSpeedConfig transformers holds (weakly), or None, to restore later with the public
    `set_hf_deepspeed_config` (the public `deepspeed_config()` gives only its dict)."""
    ref = require_attr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", "transformers")
    return ref() if ref is not None else None


def plain_cuda_arch_list() -> str | None:
    """Drop arch-specific suffixes from `TORCH_CUDA_ARCH_LIST` ("9.0a" -> "9.0") before DeepSpeed builds an op.

    DeepSpeed 0.19.8's JIT op builder (the shipped configs' FusedAdam) reads each entry with `int()` and fails on
    "9.0a" (`invalid literal for int() with base 10: '0a'`), which some PyTorch images set; the plain arch builds the
    same optimizer kernels. Returns the new value if it changed the variable, else None.
    """
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    plain = re.sub(r"(\d+\.\d+)[af]\b", r"\1", value)
    if plain == value:
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = plain
    return plain


# ---- per-instance forward swaps ------------------------------------------------------------------------------------
def swap_forward(module: nn.Module, forward: Callable, flag: str) -> None:
    """Give this one `module` `forward` and set its attribute `flag`, for `restore_forwards`. Relies on transformers
    layers dispatching through `self.forward` and on the attention forward signature (`cache=`), both internal."""
    module.forward = types.MethodType(forward, module)
    setattr(module, flag, True)


def restore_forwards(model: nn.Module, flag: str) -> int:
    """Undo `swap_forward` on every module of `model` flagged `flag`; returns how many were restored."""
    restored = 0
    for module in model.modules():
        if getattr(module, flag, False):
            del module.forward
            setattr(module, flag, False)
            restored += 1
    return restored


# ---- the FSDP plugin arguments transformers hands accelerate -------------------------------------------------------
def keep_out_of_fsdp(training_args: Any, modules: list[str], unwrap: set[str]) -> list[str]:
    """Have the Trainer's FSDP plugin leave the top-level `modules` out of FSDP and not wrap the layer classes
    `unwrap`; returns the classes taken off the wrap list.

    Edits `TrainingArguments.fsdp_plugin_args` (the keyword arguments of accelerate's plugin, built from
    `--fsdp_config`), not the environment, so a second Trainer in the process is unaffected; `fsdp_config` itself stays
    as recorded. `ignored_modules` is a regex accelerate full-matches; a user's `FSDP_IGNORED_MODULES` is kept."""
    plugin = require_attr(training_args, "fsdp_plugin_args", "transformers")
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
    """Make a Trainer built with `--fsdp` and `--use_cpu` really apply FSDP2 (gloo) instead of silently training the
    unsharded model (accelerate drops the plugin under `use_cpu`): the plugin goes on the accelerator's state, so
    `Accelerator.prepare` runs accelerate's own `fsdp2_prepare_model` as on CUDA. Call before `train()`."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    require_attr(state, "distributed_type", "accelerate")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    # later `AcceleratorState()`s copy PartialState's shared state: else the final save sees MULTI_CPU (sharded save)
    shared = require_attr(PartialState, "_shared_state", "accelerate")
    shared["distributed_type"] = DistributedType.FSDP
    require_attr(trainer, "is_fsdp_enabled", "transformers")
    trainer.is_fsdp_enabled = True
    if not trainer.accelerator.is_fsdp2:
        raise CompatError(f"fsdp_on_cpu: expected an FSDP2 config, got fsdp_version {plugin.fsdp_version}")
