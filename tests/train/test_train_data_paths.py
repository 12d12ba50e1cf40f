"""Training data paths through medrega-train on the tiny preset: text-only samples (dummy tile, every ViT parameter
still gets a gradient, as ZeRO-3/DDP need), packing with per-sample loss weights, length-grouped sampling, and
lenient vs strict handling of a bad record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from internvl.data.collate import pad_collate
from internvl.data.dataset import build_training_dataset
from internvl.train.arguments import DataTrainingArguments, MedRegTrainingArguments, ModelArguments
from internvl.train.build import build_model_and_tokenizer
from internvl.train.cli import main
from internvl.train.trainer import MedRegTrainer

from internvl.testing.square_task import write_square_dataset

TEXT_ONLY = [{"conversations": [{"from": "human", "value": "What organ filters blood?"},
                                {"from": "gpt", "value": "The kidney."}]},
             {"conversations": [{"from": "human", "value": "Name a lung finding."},
                                {"from": "gpt", "value": "A small pleural effusion."}]}]


def mixed_meta(root: Path, bad_line: bool = False) -> Path:
    meta = write_square_dataset(root, n=6, seed=3)
    text = root / "text.jsonl"
    lines = [json.dumps(r) for r in TEXT_ONLY * 2]
    if bad_line:
        lines.insert(1, json.dumps({"conversations": [{"from": "gpt", "value": "answer without a question"}]}))
    text.write_text("\n".join(lines) + "\n")
    registry = json.loads(meta.read_text())
    registry["text"] = {"root": str(root), "annotation": str(text), "data_augment": False, "repeat_time": 1,
                        "length": 4, "base_prompt": ""}
    meta.write_text(json.dumps(registry))
    return meta


def test_text_only_batch_reaches_every_vision_parameter(tmp_path, tiny_tokenizer_dir):
    meta = mixed_meta(tmp_path / "data")
    built = build_model_and_tokenizer(
        ModelArguments(preset="tiny", tokenizer_path=str(tiny_tokenizer_dir), grad_checkpoint=False),
        DataTrainingArguments(meta_path=str(meta)))
    dataset = build_training_dataset(meta, tokenizer=built.tokenizer, config=built.model.config)
    text_items = [dataset[i] for i in range(len(dataset)) if int(dataset[i]["image_flags"].sum()) == 0]
    assert len(text_items) == 4
    batch = pad_collate(text_items[:2])
    assert batch["pixel_values"].shape[0] == 2 and int(batch["image_flags"].sum()) == 0
    trainer = MedRegTrainer(model=built.model, args=MedRegTrainingArguments(output_dir=str(tmp_path / "o"),
                                                                             use_cpu=True, report_to="none"))
    built.model.train()
    loss = trainer.compute_loss(built.model, batch)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, p in list(built.model.vision_model.named_parameters()) + list(built.model.mlp1.named_parameters()):
        assert p.grad is not None, name  # touched (with zero weight): ranks stay in step under ZeRO-3
        assert float(p.grad.abs().max()) == 0.0, name  # ... and the dummy tile does not change the loss


def _cli(tmp_path, tokenizer_dir, meta, *extra):
    return main(["--preset", "tiny", "--tokenizer_path", str(tokenizer_dir), "--meta_path", str(meta),
                 "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--per_device_train_batch_size", "4",
                 "--learning_rate", "1e-3", "--save_strategy", "no", "--logging_steps", "1", "--use_cpu", "True",
                 "--disable_tqdm", "True", "--report_to", "none", "--grad_checkpoint", "True", *extra])


@pytest.mark.parametrize("extra", [["--use_packed_ds", "True", "--max_packed_tokens", "512",
                                    "--loss_reduction", "square"],
                                   ["--group_by_length", "True"]], ids=["packed", "grouped"])
def test_packing_and_length_grouping_train(tmp_path, tiny_tokenizer_dir, extra):
    meta = mixed_meta(tmp_path / "data")
    assert _cli(tmp_path, tiny_tokenizer_dir, meta, *extra) == 0
    state = json.loads((tmp_path / "run" / "trainer_state.json").read_text())
    logged = [e for e in state["log_history"] if "loss" in e]
    assert len(logged) == 3 and all(0 < e["loss"] < 20 for e in logged)
    config = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert config["data"]["use_packed_ds" if "--use_packed_ds" in extra else "group_by_length"] is True


def test_strict_stops_on_a_bad_record_lenient_leaves_it_out(tmp_path, tiny_tokenizer_dir, capsys):
    meta = mixed_meta(tmp_path / "data", bad_line=True)
    assert _cli(tmp_path, tiny_tokenizer_dir, meta) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'data' / 'text.jsonl'}:2:" in err and "--data_check lenient" in err
    assert _cli(tmp_path / "lenient", tiny_tokenizer_dir, meta, "--data_check", "lenient") == 0
    config = json.loads((tmp_path / "lenient" / "run" / "run_config.json").read_text())
    assert config["resolved"]["num_train_samples"] == 6 + 4
