"""`DecodeConfig`: the options of the static-cache greedy decoder (`internvl.model.fast_generate`), one frozen
dataclass with the measured defaults. Kept apart from the decoder so that a model can hold one without importing the
decoder (which imports Triton and registers custom ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

#: language models above this many parameters get the "eager" backend and a one-layer compile under "auto": inductor's
#: compile of a whole deep step costs about a minute per shape (69 s against 12 s on the 40B model, H100).
AUTO_INDUCTOR_MAX_PARAMS = 5_000_000_000


@dataclass(frozen=True)
class DecodeConfig:
    """How the greedy decoder runs; the defaults are the measured ones of `generate` / `chat` / `batch_chat`
    (docs/performance.md). Set it with `model.decode_config = DecodeConfig(...)`. Every "auto" is resolved per
    model, device and batch size:

    backend: dynamo backend of the step: "auto" ("inductor" up to AUTO_INDUCTOR_MAX_PARAMS parameters, "eager"
        above), "inductor" (fuses norms, RoPE, SwiGLU; a compile per (batch, cache length)), "eager" (traced only) or
        None (plain eager step, no CUDA graph).
    compile_scope: what the packed step compiles: "auto" ("layer" above AUTO_INDUCTOR_MAX_PARAMS, else "step"),
        "step" (the whole step) or "layer" (one decoder layer reused by every layer, with `backend`, "inductor" for
        "auto": on the 40B model the same step time for 18 instead of 42 s of warm-up per shape).
    packed: pack q/k/v and gate/up of Llama / Qwen2 models into one tensor per group (parameters re-pointed, no extra
        memory) and run our own layer loop. "auto": weights always packed; the packed step wherever our Triton
        attention or GEMV runs, else except where inductor's tuned step runs (batch 1 without our GEMV).
    attention: "auto" ("triton" where our kernel runs: Triton on the device, the packed step, a power-of-two head
        dim >= 16; else "sdpa"), "sdpa" (grouped-query SDPA without repeating K/V) or "triton" (packed step only).
    gemv: run the batch-1 packed step's products through our Triton GEMV ("auto": where Triton runs and the packed
        step applies).
    tuning: inductor's coordinate-descent tuning ("auto": at batch 1 when our GEMV does not run there).
    cuda_graph: capture the traced step as a CUDA graph (CUDA only).
    check_every: tokens between host checks of "all rows finished".

    The lab (`lab/decode_variants.py`) subclasses this with the variants that lost the measurements.
    """

    backend: str | None = "auto"
    compile_scope: str = "auto"
    packed: bool | str = "auto"
    attention: str = "auto"
    gemv: bool | str = "auto"
    tuning: bool | str = "auto"
    cuda_graph: bool = True
    check_every: int = 32

    #: the values each option accepts, and the decoder class that runs it (None: `StaticGreedyDecoder`).
    ATTENTIONS: ClassVar[tuple[str, ...]] = ("auto", "sdpa", "triton")
    BACKENDS: ClassVar[tuple[str | None, ...]] = ("auto", "inductor", "eager", None)
    decoder_class: ClassVar[type | None] = None

    def __post_init__(self) -> None:
        allowed = {"backend": self.BACKENDS, "compile_scope": ("auto", "step", "layer"), "attention": self.ATTENTIONS,
                   "packed": (True, False, "auto"), "gemv": (True, False, "auto"), "tuning": (True, False, "auto")}
        for name, values in allowed.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")
        if int(self.check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")
