"""`DecodeConfig`: the options of the static-cache greedy decoder (`internvl.model.fast_generate`), one frozen
dataclass with the measured defaults. Kept apart from the decoder so that a model can hold one without importing the
decoder (which imports Triton and registers custom ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

#: language models with more parameters than this compile one decoder layer of the packed step under "auto"
#: (`compile_scope`), and a whole step that does not run packed with the traced "eager" backend: inductor's compile of
#: a whole deep step costs about a minute per shape (69 s against 12 s of warm-up on the 40B model, H100), while its
#: fusion of the norms, RoPE and SwiGLU took the int8 40B step from 16.0 to 12.4 ms.
AUTO_INDUCTOR_MAX_PARAMS = 5_000_000_000


@dataclass(frozen=True)
class DecodeConfig:
    """How the static-cache greedy decoder runs. The defaults are the measured defaults of `generate` / `chat` /
    `batch_chat` (docs/performance.md, "Results"); every "auto" is resolved per model, device and batch size as
    described here. Set it on a model with `model.decode_config = DecodeConfig(...)` (or `dataclasses.replace`).

    backend: dynamo backend of the decode step: "auto" (default: "inductor" for language models up to
        AUTO_INDUCTOR_MAX_PARAMS parameters, "eager" above, where the packed step compiles one layer with "inductor"
        instead: `compile_scope`), "inductor" (fuses norms, RoPE, SwiGLU; a compile per new
        (batch, cache length)), "eager" (traced only: no host syncs, cheap to build) or None (plain eager step launched
        from Python, no CUDA graph).
    compile_scope: what the packed step compiles: "auto" (default: "layer" for language models above
        AUTO_INDUCTOR_MAX_PARAMS parameters, else "step"), "step" (the whole step by `backend`) or "layer" (one
        decoder layer, compiled once and reused by every layer: on the 40B model the same step, 12.98 vs 13.13 ms,
        for 18 instead of 42 s of warm-up per new (batch, cache length), docs/performance.md; the layer's backend is
        `backend`, "inductor" for "auto"; the rest of the step runs eagerly, the whole step is still one CUDA graph).
        Steps that do not run packed always compile the whole step.
    packed: for Llama / Qwen2 language models whose q/k/v and gate/up are plain `nn.Linear`s, pack those weights into
        one tensor per group (the parameters are re-pointed into it, no extra memory) and run our own layer loop over
        them. "auto" (default): weights packed always; the packed step wherever our Triton attention or GEMV runs,
        otherwise except where inductor's coordinate-descent tuning runs (batch 1 without our GEMV), where the
        model's own forward, tuned, was measured faster. True / False force it on / off.
    attention: decode attention: "auto" (default: "triton" where our kernel runs, i.e. Triton on the device, the
        packed step and a power-of-two head dim >= 16; else "sdpa"), "sdpa" (grouped-query SDPA without repeating
        K/V, `sdpa_gqa_decode_attention`) or "triton" (packed step only: our split-cache flash-decoding kernel,
        `internvl.ops.decode_kernels.gqa_decode_attention`).
    gemv: run the packed step's one-row products (q/k/v, o, gate/up, down, LM head) at batch 1 through our Triton
        matrix-vector kernel (`internvl.ops.decode_kernels.gemv`). "auto" (default: where Triton runs on the device
        and the packed step applies), True, False.
    tuning: inductor's coordinate-descent tuning of the step: "auto" (default: at batch 1 when our GEMV does not run
        there; with the GEMV, tuning the remaining elementwise kernels was measured slower), True, False.
    cuda_graph: capture the traced decode step as a CUDA graph (CUDA only; default True).
    check_every: tokens between host checks of "all rows finished" (default 32).

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

    #: the attention kinds this configuration accepts, and the decoder class that runs it (None: the product's
    #: `StaticGreedyDecoder`); the lab's subclass extends both.
    ATTENTIONS: ClassVar[tuple[str, ...]] = ("auto", "sdpa", "triton")
    decoder_class: ClassVar[type | None] = None
    BACKENDS: ClassVar[tuple[str | None, ...]] = ("auto", "inductor", "eager", None)

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {self.backend!r}")
        if self.compile_scope not in ("auto", "step", "layer"):
            raise ValueError(f"compile_scope must be 'auto', 'step' or 'layer', got {self.compile_scope!r}")
        if self.attention not in self.ATTENTIONS:
            raise ValueError(f"attention must be one of {self.ATTENTIONS}, got {self.attention!r}")
        for name in ("packed", "gemv", "tuning"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"{name} must be True, False or 'auto', got {getattr(self, name)!r}")
        if int(self.check_every) < 1:
            raise ValueError(f"check_every must be >= 1, got {self.check_every}")

