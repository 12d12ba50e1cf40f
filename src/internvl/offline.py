"""Offline mode for every entry point: the toolkit never reaches a model hub or sends telemetry.

Every console script, ``src/demo.py`` and ``scripts/`` call :func:`enforce_offline` first thing, before transformers
or PEFT are imported: ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at import, and ``import peft`` may ask the
hub for a kernel at import unless offline mode is on.
"""
from __future__ import annotations

import os
import sys

# Values forced for the whole process (and inherited by subprocesses such as torchrun workers or DeepSpeed).
OFFLINE_ENVIRONMENT: dict[str, str] = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
                                       "DISABLE_TELEMETRY": "1", "USE_HUB_KERNELS": "NO",
                                       "GRADIO_ANALYTICS_ENABLED": "False"}


def enforce_offline() -> None:
    """Set :data:`OFFLINE_ENVIRONMENT` and, when ``huggingface_hub`` is already imported, its cached offline flag."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
