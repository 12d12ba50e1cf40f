"""Batched generation shared by `medrega-eval run` and `src/demo.py` (the web UI's chat and `--batch`): load and
tile each request's images, then `InternVLChatModel.batch_chat` on batches grouped by tile count and prompt length.
Usage: docs/evaluation.md (section `internvl.inference`).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from PIL import Image

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.data.images import load_image
from internvl.image_processing import images_to_pixel_values

__all__ = ["DistInfo", "GenerationRequest", "GenerationSettings", "Generator", "ModelLoadError", "batch_order",
           "default_dtype", "init_distributed", "load_model_and_tokenizer"]


class ModelLoadError(RuntimeError):
    """The model directory is missing, incomplete or asks for something this machine lacks (e.g. bitsandbytes)."""


@dataclass
class GenerationRequest:
    """One prompt: the user turn (`<image>` marks each image, default: images first), PIL images or paths for
    `load_image` (with `image_kwargs`), the caller's `id`, earlier (question, answer) turns (`history`) and the
    prompt's language where the caller knows it ("en"/"zh"; Regional CoT words its prompts in it)."""

    prompt: str
    images: Sequence[Image.Image | str | os.PathLike] = ()
    image_kwargs: dict[str, Any] = field(default_factory=dict)
    id: str | None = None
    history: Sequence[tuple[str, str]] = ()
    lang: str | None = None


@dataclass
class GenerationSettings:
    """Decoding settings; the defaults are MedRegA's evaluation protocol (greedy, 400 new tokens, at least 1)."""

    max_new_tokens: int = 400
    min_new_tokens: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0

    def to_kwargs(self) -> dict[str, Any]:
        """kwargs for `generate`; sampling knobs only when sampling (keeps transformers from warning)."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                                  "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs

    def as_dict(self) -> dict[str, Any]:
        """The settings as recorded in `run_settings.json`."""
        return asdict(self)

    @classmethod
    def from_args(cls, args: Any) -> GenerationSettings:
        """From the options of ``internvl.cli_support.add_generation_arguments`` (greedy unless --temperature > 0)."""
        sample = args.temperature > 0
        return cls(max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, do_sample=sample,
                   temperature=args.temperature if sample else 1.0)


@dataclass
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized: bool = False

    @property
    def device(self) -> str:
        """``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group this process joined (a no-op without one)."""
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (NCCL, one GPU per LOCAL_RANK, or gloo without CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(rank, world, local, True)


def default_dtype(device: str | torch.device | None = None) -> str:
    """The weights dtype when the user names none: float32 on CPU (half matmuls are slow or missing there), bfloat16
    on a GPU that supports it (MedRegA's training dtype), else float16. ``device`` None: CUDA when available."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def load_model_and_tokenizer(path: str | os.PathLike, dtype: str | torch.dtype | None = "bfloat16",
                             device_map: str | dict | None = None, load_in_8bit: bool = False,
                             load_in_4bit: bool = False, device: str | torch.device | None = None) -> tuple[Any, Any]:
    """Load an InternVLChatModel (eval mode) and its tokenizer from a local directory with
    `internvl.model.loading.load_pretrained`; `device` applies when neither a device map nor 8-/4-bit places the
    model. Failures are `ModelLoadError`."""
    # lazy: the model and tokenizer stacks are slow to import, and `medrega-eval score` needs neither
    from internvl.model.loading import CheckpointError, find_weight_files, load_pretrained
    from internvl.tokenization import load_tokenizer

    directory = Path(path)
    try:
        find_weight_files(directory)  # a bad directory fails before the tokenizer is read
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from exc
    tokenizer = load_tokenizer(directory)
    try:
        model = load_pretrained(directory, dtype=dtype, device_map=device_map,
                                load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit)
    except ImportError as exc:  # 8-/4-bit without bitsandbytes
        raise ModelLoadError(str(exc)) from exc
    except (OSError, CheckpointError) as exc:
        raise ModelLoadError(f"{directory}: cannot load the model: {exc}") from exc
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    if device is not None and device_map is None and not (load_in_8bit or load_in_4bit):
        model = model.to(device)
    return model, tokenizer


def batch_order(requests: Sequence[GenerationRequest], batch_size: int) -> list[list[int]]:
    """Request indices in batches of `batch_size`, sorted by (image count, prompt length) so that a batch pads
    little: the one batching rule of `Generator.iter_generate` and `medrega-eval run`'s retrying loop."""
    order = sorted(range(len(requests)), key=lambda i: (len(requests[i].images), len(requests[i].prompt)))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


class Generator:
    """Batched generation over `GenerationRequest`s with a model's `batch_chat`, `batch_size` requests per pass."""

    def __init__(self, model: Any, tokenizer: Any, settings: GenerationSettings | None = None, batch_size: int = 8
                 ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or GenerationSettings()
        self.batch_size = batch_size
        vision_param = next(model.vision_model.parameters())
        self._pixel_device = vision_param.device
        self._pixel_dtype = vision_param.dtype if vision_param.dtype.is_floating_point else torch.bfloat16

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Answers for one batch, in order (no reordering; the caller chooses the batch)."""
        tiles: list[torch.Tensor] = []
        num_patches_list: list[list[int]] = []
        for request in requests:
            images = [img.convert("RGB") if isinstance(img, Image.Image) else load_image(img, **request.image_kwargs)
                      for img in request.images]
            patches: list[int] = []
            if images:
                pixel_values, patches = images_to_pixel_values(images, self.model.config)
                tiles.append(pixel_values)
            num_patches_list.append(patches)
        pixel_values = torch.cat(tiles).to(self._pixel_device, self._pixel_dtype) if tiles else None
        return self.model.batch_chat(self.tokenizer, pixel_values, [r.prompt for r in requests],
                                     generation_config=self.settings.to_kwargs(), num_patches_list=num_patches_list,
                                     histories=[list(r.history) for r in requests])

    def iter_generate(self, requests: Sequence[GenerationRequest]) -> Iterator[list[tuple[int, str]]]:
        """Yield [(request index, answer), ...] one batch at a time (for progress bars and crash-safe writing)."""
        for idx in batch_order(requests, self.batch_size):
            yield list(zip(idx, self.generate_batch([requests[i] for i in idx])))

    def generate(self, requests: Sequence[GenerationRequest]) -> list[str]:
        """Answers for `requests`, in order (batched by :meth:`iter_generate`)."""
        answers = [""] * len(requests)
        for batch in self.iter_generate(requests):
            for i, text in batch:
                answers[i] = text
        return answers
