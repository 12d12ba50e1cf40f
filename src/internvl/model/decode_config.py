"""`DecodeConfig`: how the static-cache greedy decoder (`internvl.model.fast_generate`) runs. Kept apart from the
decoder so that a model can hold one without importing the decoder (which imports Triton and registers custom ops).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

#: language models above this many parameters get the "eager" backend and a one-layer compile under "auto": inductor's
#: compile of a whole deep step costs about a minute per shape (69 s against 12 s on the 40B model, H100).
AUTO_INDUCTOR_MAX_PARAMS = 5_000_000_000


@dataclass(frozen=True)
class DecodeConfig:
    """The decoder's one option; everything else is resolved per model, device and batch size by the measured rules
    of `StaticGreedyDecoder` (docs/performance.md, "The decoder's options"). Set it with
    `model.decode_config = DecodeConfig(...)`.

    backend: dynamo backend of the step: "auto" ("inductor" up to AUTO_INDUCTOR_MAX_PARAMS parameters, "eager"
        above), "inductor", "eager" (traced only) or None (plain eager step, no CUDA graph).

    The lab (`lab/decode_variants.py`) subclasses this with the variants that lost the measurements.
    """

    backend: str | None = "auto"

    #: the backends accepted, and the decoder class that runs the config (None: `StaticGreedyDecoder`).
    BACKENDS: ClassVar[tuple[str | None, ...]] = ("auto", "inductor", "eager", None)
    decoder_class: ClassVar[type | None] = None

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {self.BACKENDS}, got {self.backend!r}")
