"""Offline mode for every entry point: the toolkit never reaches a model hub or sends telemetry.

Every console script (``medrega-data``, ``medrega-train``, ``medrega-eval``), ``src/demo.py`` and the scripts in
``scripts/`` call :func:`enforce_offline` first thing, before transformers or PEFT are imported where their module
imports them at the top. Why "before": several libraries read these switches once, at import, and some reach the
network at import:

* ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` into ``huggingface_hub.constants.HF_HUB_OFFLINE`` when it is first
  imported; transformers, PEFT and ``kernels`` consult that value afterwards.
* ``import peft`` imports bitsandbytes, whose CPU backend calls ``kernels.get_kernel(...)`` at import on CPUs with
  AVX512-BF16, which asks the hub for a kernel repository unless offline mode is on.
* PEFT's ``from_pretrained`` probes the hub for adapter files (``check_file_exists_on_hf_hub``) unless
  ``HF_HUB_OFFLINE`` is set in the environment.
* transformers may load "hub kernels" (``USE_HUB_KERNELS``); gradio sends analytics (``GRADIO_ANALYTICS_ENABLED``);
  the hub and transformers send telemetry (``HF_HUB_DISABLE_TELEMETRY``, ``DISABLE_TELEMETRY``).

Models and data are always local paths; a hub repo id fails with the libraries' own "offline" error instead of a
download. ``tests/test_offline_entry_points.py`` runs every console script with non-loopback sockets refused.
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
    """Switch the process to offline mode: set :data:`OFFLINE_ENVIRONMENT` and, when ``huggingface_hub`` was imported
    before this call, its cached offline flag as well (it reads the variable only at import). Idempotent."""
    os.environ.update(OFFLINE_ENVIRONMENT)
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
