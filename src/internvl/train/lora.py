"""LoRA on the LLM and/or the ViT of an InternVL-Chat model, with PEFT, and adapter save/merge helpers.

Wiring follows the original model class (architecture notes §1.7): rank r, alpha 2r, dropout 0.05; LLM targets per
architecture (`LLM_LORA_TARGETS`), ViT targets `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`. The wrapped towers stay
at `model.language_model` / `model.vision_model`. A run saves PEFT adapters under `<dir>/adapters/<tower>/`, its other
trainable weights (e.g. the projector) with original-layout keys in `non_lora_trainables.safetensors`, and
`lora_run.json`; `medrega-merge-lora` folds it all into a full checkpoint in the original layout.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from internvl.model import InternVLChatModel
from internvl.tokenization import load_tokenizer, resize_embeddings_mean, save_tokenizer
from internvl.train.qlora import dequantize_round_trip_

ADAPTERS_DIRNAME = "adapters"
NON_LORA_FILENAME = "non_lora_trainables.safetensors"
LORA_INFO_FILENAME = "lora_run.json"
LORA_PARTS = ("language_model", "vision_model")
QUANT_INFO_KEY = "base_quantization"  # lora_run.json: how the LLM base was quantised in training (QLoRA), if it was

LLM_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.down_proj", "mlp.up_proj"],
    "phi3": ["mlp.down_proj", "mlp.gate_up_proj", "self_attn.o_proj", "self_attn.qkv_proj"],
}
VIT_LORA_TARGETS = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


def llm_lora_targets(language_model: nn.Module) -> list[str]:
    """LoRA target module suffixes for `language_model`, chosen from the module names it actually has."""
    names = {name for name, _ in language_model.named_modules()}
    for family, targets in LLM_LORA_TARGETS.items():
        if all(any(n.endswith(t) for n in names) for t in targets):
            return list(targets)
    raise ValueError(f"no LoRA target set fits the language model {type(language_model).__name__}; "
                     f"known families: {sorted(LLM_LORA_TARGETS)}")


def wrap_llm_lora(model: nn.Module, r: int, dropout: float = 0.05) -> None:
    """Wrap `model.language_model` with LoRA (rank r, alpha 2r) in place; the base LLM weights become frozen."""
    _wrap_lora(model, "language_model", "use_llm_lora", r, dropout, llm_lora_targets(model.language_model),
               task_type="CAUSAL_LM")


def wrap_backbone_lora(model: nn.Module, r: int, dropout: float = 0.05) -> None:
    """Wrap `model.vision_model` with LoRA (rank r, alpha 2r) in place; the base ViT weights become frozen."""
    _wrap_lora(model, "vision_model", "use_backbone_lora", r, dropout, list(VIT_LORA_TARGETS))


def _wrap_lora(model: nn.Module, part: str, rank_field: str, r: int, dropout: float, targets: list[str],
               **lora_kwargs: str) -> None:
    if isinstance(getattr(model, part), PeftModel):
        raise ValueError(f"{part} already carries LoRA adapters")
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets, **lora_kwargs)
    setattr(model, part, get_peft_model(getattr(model, part), config))
    if hasattr(model, "config"):
        setattr(model.config, rank_field, r)


def has_lora(model: nn.Module) -> bool:
    """True if the LLM or the ViT of `model` is wrapped by PEFT."""
    return any(isinstance(getattr(model, part, None), PeftModel) for part in LORA_PARTS)


def to_original_key(key: str) -> str:
    """Map a peft-wrapped state-dict key back to the original layout (drops `base_model.model.` and `.base_layer`)."""
    for part in LORA_PARTS:
        prefix = f"{part}.base_model.model."
        if key.startswith(prefix):
            key = f"{part}." + key[len(prefix):]
    return key.replace(".base_layer.", ".")


def save_lora_run(model: nn.Module, output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                  base_model: str | None = None) -> list[Path]:
    """Save a LoRA run: PEFT adapters per wrapped part + the other trainable weights + `lora_run.json` (naming the
    frozen base checkpoint `base_model`). `state_dict`: the full (under ZeRO-3 gathered) state dict, default
    `model.state_dict()`. Returns the written paths."""
    out = Path(output_dir)
    state_dict = model.state_dict() if state_dict is None else state_dict
    written: list[Path] = []
    for part in LORA_PARTS:
        sub = getattr(model, part, None)
        if not isinstance(sub, PeftModel):
            continue
        prefix = f"{part}."
        part_state = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        target = out / ADAPTERS_DIRNAME / part
        for cfg in sub.peft_config.values():
            cfg.base_model_name_or_path = base_model
        sub.save_pretrained(str(target), state_dict=part_state, safe_serialization=True)
        written.append(target)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
    extra = {to_original_key(k): v.detach().cpu().contiguous() for k, v in state_dict.items() if k in trainable}
    if extra:
        save_file(extra, str(out / NON_LORA_FILENAME), metadata={"format": "pt"})
        written.append(out / NON_LORA_FILENAME)
    config = getattr(model, "config", None)
    info = {"base_model": base_model, "adapters": [p.name for p in written if p.parent.name == ADAPTERS_DIRNAME],
            **{name: int(getattr(config, name, 0) or 0) for name in ("use_llm_lora", "use_backbone_lora")},
            "non_lora_trainables": sorted(extra)}
    if getattr(model, "qlora_spec", None) is not None:  # QLoRA: trained against the NF4 base; the merge redoes it
        info[QUANT_INFO_KEY] = model.qlora_spec
    (out / LORA_INFO_FILENAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    written.append(out / LORA_INFO_FILENAME)
    return written


def read_lora_info(run_dir: str | os.PathLike) -> tuple[Path, dict]:
    """(path, content) of the run's `lora_run.json`; `FileNotFoundError` naming it when `run_dir` is no LoRA run."""
    info_path = Path(run_dir) / LORA_INFO_FILENAME
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: not a LoRA run directory (missing {LORA_INFO_FILENAME})")
    try:
        return info_path, json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{info_path}: not valid JSON ({exc})") from None


def load_base(base_model: str | os.PathLike, dtype: torch.dtype, vocab: int) -> nn.Module:
    """The base checkpoint of a LoRA run, its embeddings grown to `vocab` rows (the deterministic mean rows that
    training added for new special tokens)."""
    model = InternVLChatModel.from_pretrained(str(base_model), dtype=dtype)
    if model.get_input_embeddings().weight.shape[0] != vocab:
        resize_embeddings_mean(model, vocab)
    return model


def load_lora_run(model: nn.Module, run_dir: str | os.PathLike, is_trainable: bool = False) -> None:
    """Attach the adapters of a saved LoRA run to `model` (or reload them into its adapters: resume) and load its
    other trained weights, in place. An unwrapped base of a QLoRA run (`base_quantization` in lora_run.json) first
    gets the NF4 round trip of its LLM weights (`qlora.dequantize_round_trip_`), so it computes what was trained.
    `FileNotFoundError`/`ValueError` naming the file when the run is incomplete or does not fit the model."""
    run = Path(run_dir)
    info_path, info = read_lora_info(run)
    wrapped = sorted(part for part in LORA_PARTS if isinstance(getattr(model, part, None), PeftModel))
    if wrapped and wrapped != sorted(info["adapters"]):  # resume: the run must hold exactly the model's adapters
        raise ValueError(f"{info_path}: the run has adapters for {sorted(info['adapters'])} but the model wraps "
                         f"{wrapped} (were the LoRA flags changed since the run started?)")
    spec = info.get(QUANT_INFO_KEY)
    if spec is not None and "language_model" in info["adapters"] and not has_lora(model):
        # trained on a 4-bit LLM: give the (unquantised) base the weights training saw, dequant(quant(W))
        dequantize_round_trip_(model.language_model, spec)
    for part in info["adapters"]:
        adapter_dir = run / ADAPTERS_DIRNAME / part
        sub = getattr(model, part)
        if isinstance(sub, PeftModel):  # resume: the run's own adapters, reloaded in place
            result = sub.load_adapter(str(adapter_dir), adapter_name="default", is_trainable=is_trainable)
            if result.unexpected_keys:
                raise ValueError(f"{adapter_dir}: unexpected keys {result.unexpected_keys[:5]}")
        else:
            setattr(model, part, PeftModel.from_pretrained(sub, str(adapter_dir), is_trainable=is_trainable))
    extra_path = run / NON_LORA_FILENAME
    if info["non_lora_trainables"]:
        if not extra_path.is_file():
            raise FileNotFoundError(f"{extra_path}: listed in {info_path} but missing")
        load_original_keys(model, load_file(str(extra_path)), source=str(extra_path))


def load_original_keys(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy original-layout `tensors` into a (possibly peft-wrapped) model; every key must exist with its shape."""
    by_original = {to_original_key(name): p for name, p in model.named_parameters()}
    for key, value in tensors.items():
        if key not in by_original:
            raise ValueError(f"{source}: key {key} does not exist in the model")
        param = by_original[key]
        if param.shape != value.shape:
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base layers and unwrap, in place; resets the LoRA ranks in `model.config`."""
    for part in LORA_PARTS:
        sub = getattr(model, part, None)
        if isinstance(sub, PeftModel):
            setattr(model, part, sub.merge_and_unload())
    if hasattr(model, "config"):
        model.config.use_llm_lora = 0
        model.config.use_backbone_lora = 0
    return model


def merge_lora_run(run_dir: str | os.PathLike, output_dir: str | os.PathLike, base_model: str | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """Base checkpoint (`base_model`, else the run's `lora_run.json`) + a saved LoRA run -> one full checkpoint in the
    original layout at `output_dir`, with the run's tokenizer (its added tokens get the training's mean embedding
    rows). The result is reloaded and must have no missing or unexpected keys (`ValueError` otherwise)."""
    run = Path(run_dir)
    info_path, info = read_lora_info(run)
    base = base_model or info.get("base_model")
    if not base or not Path(base).is_dir():
        raise FileNotFoundError(f"{info_path}: base model directory {base!r} not found (pass --base_model)")
    tokenizer = load_tokenizer(run if (run / "tokenizer_config.json").is_file() else Path(base))
    model = load_base(base, dtype, len(tokenizer))
    load_lora_run(model, run)
    merge_lora(model)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    _, loading_info = InternVLChatModel.from_pretrained(str(out), dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in loading_info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise ValueError(f"{out}: merged checkpoint does not load cleanly: {problems}")
    return out
