"""`medrega-train` run in-process with `--deepspeed` leaves no DeepSpeed config registered with transformers."""
from __future__ import annotations

from pathlib import Path

from transformers.integrations import is_deepspeed_zero3_enabled

from internvl.train import cli

ROOT = Path(__file__).resolve().parents[2]


def test_main_releases_the_deepspeed_config_when_the_run_ends(tmp_path, monkeypatch):
    seen = {}

    def fake_train(model_args, data_args, training_args):
        seen["args"] = training_args  # keeps the run's arguments (and their DeepSpeed config) alive after main
        seen["zero3_during_run"] = is_deepspeed_zero3_enabled()
        return {}

    monkeypatch.setattr(cli, "train", fake_train)
    rc = cli.main(["--model_name_or_path", str(ROOT / "asset" / "medreg-mini-model"),
                   "--meta_path", str(tmp_path / "meta.json"), "--output_dir", str(tmp_path / "out"),
                   "--deepspeed", str(ROOT / "src" / "shell" / "zero_stage3_config.json"), "--use_cpu", "True"])
    assert rc == 0 and seen["zero3_during_run"]
    assert seen["args"].hf_deepspeed_config is not None  # still alive, but no longer registered
    assert not is_deepspeed_zero3_enabled()
