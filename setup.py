"""Installable MedRegA toolkit: the `internvl` model package and the separate `medrega_eval` package."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
TRAIN = ["deepspeed>=0.15"]  # the `train` extra; the tests need it too


def read_requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="medrega-toolkit",
    version="0.1.0",
    description="Run, fine-tune and evaluate MedRegA, a bilingual region-aware medical MLLM (InternVL-Chat-V1.2).",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    package_dir={"": "src"},
    packages=find_packages("src"),
    include_package_data=True,
    package_data={
        "internvl": ["model/presets/*.json", "templates/*.json", "data/prompts/*.yaml", "demo/strings.json"],
        "medrega_eval": ["benchmarks/*.yaml"],
    },
    install_requires=read_requirements(),
    extras_require={
        "train": TRAIN,
        "quant": ["bitsandbytes>=0.43"],
        "flash": ["flash-attn>=2.5"],
        # everything the tests import (deepspeed: the ZeRO-3, memory-plan and DeepSpeed-config tests)
        "test": [*TRAIN, "pytest>=8", "pytest-xdist>=3.5", "pytest-randomly>=3.15", "hypothesis>=6.100",
                 "scikit-image>=0.22", "playwright>=1.45", "bitsandbytes>=0.50", "triton>=3.4"],  # bnb 0.50: NF4 on the CPU (QLoRA tests)
    },
    entry_points={
        "console_scripts": [
            "medrega-data=internvl.data.cli:main",
            "medrega-train=internvl.train.cli:main",
            "medrega-eval=medrega_eval.cli:main",
            "medrega-merge-lora=internvl.train.merge_lora:main",
            "medrega-convert-hf=internvl.model.convert_hf:main",
        ]
    },
)
