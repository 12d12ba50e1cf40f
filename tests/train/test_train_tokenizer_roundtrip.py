"""Fine-tune the bundled model one step through `medrega-train` (full and LoRA), save, reload and compare with the
trained model still in memory: every saved directory (run dir, checkpoint, merged model) holds a tokenizer that
behaves exactly like the trained one and like the bundled one it came from (also after conversion to the native
transformers layout), and the reloaded (and, for LoRA, merged)
model gives the same greedy answers, region tags included.

The trainer is the real one (`internvl.train.cli.main`); the test only keeps a reference to it to read the model and
tokenizer as they are in memory after training. The merge runs `medrega-merge-lora` (as `python -m internvl.train.merge_lora`) as a user would.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import internvl.train.cli as cli_module
from internvl.demo.tasks import build_prompt
from internvl.image_processing import images_to_pixel_values
from internvl.model import InternVLChatModel
from internvl.model.hf_conversion import convert_checkpoint_to_hf
from internvl.regions import parse_regions
from internvl.tokenization import load_tokenizer, tokenizer_behaviour
from internvl.train.cli import main
from internvl.train.lora import load_lora_run

from internvl.testing.square_task import write_square_dataset

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "asset" / "medreg-mini-model"
IMAGE = ROOT / "asset" / "examples" / "brain_mri_axial_096.jpg"
MERGE = [sys.executable, "-m", "internvl.train.merge_lora"]  # what `medrega-merge-lora` runs
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "added_tokens.json",
                   "special_tokens_map.json")
QUESTIONS = [build_prompt("text_to_region", "en", objects="brain, cerebellum"), build_prompt("grounded_report", "zh")]


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return write_square_dataset(tmp_path_factory.mktemp("squares"), n=4, seed=0)


@pytest.fixture(autouse=True)
def one_thread():
    """A 15M model: one thread is fastest, and far faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def source_behaviour() -> dict:
    return tokenizer_behaviour(load_tokenizer(BUNDLED))


def _train(out: Path, meta: Path, monkeypatch, *extra: str):
    """One optimizer step of `medrega-train` on the bundled model; returns the Trainer it ran."""
    trainers = []

    class Kept(cli_module.MedRegTrainer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(cli_module, "MedRegTrainer", Kept)
    code = main(["--model_name_or_path", str(BUNDLED), "--meta_path", str(meta), "--output_dir", str(out),
                 "--max_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-4",
                 "--warmup_steps", "0", "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1",
                 "--use_cpu", "True", "--seed", "0", "--disable_tqdm", "True",
                 "--report_to", "none", "--grad_checkpoint", "False", "--max_seq_length", "512", *extra])
    assert code == 0 and len(trainers) == 1
    return trainers[0]


def _answers(model, tokenizer) -> list[str]:
    """Greedy batch_chat answers to a multi-object Text-to-Region and a Chinese grounded-report question."""
    model = model.eval()
    pixel_values, _ = images_to_pixel_values([Image.open(IMAGE).convert("RGB")] * len(QUESTIONS), model.config)
    with torch.no_grad():
        return model.batch_chat(tokenizer, pixel_values, QUESTIONS, {"max_new_tokens": 64, "do_sample": False},
                                num_patches_list=[1] * len(QUESTIONS))


def _check_tokenizer_dir(directory: Path, expected: dict) -> object:
    for name in TOKENIZER_FILES:
        assert (directory / name).is_file(), directory / name
    tokenizer = load_tokenizer(directory)
    assert tokenizer_behaviour(tokenizer) == expected, directory
    return tokenizer


def _check_region_answers(answers: list[str]) -> None:
    # the policy: answers carry the tags, and a multi-object answer parses into separate named regions
    assert all("<ref>" in a and "</box>" in a for a in answers), answers
    regions = parse_regions(answers[0])
    assert len(regions) >= 2 and all(r.name and r.boxes for r in regions), answers[0]


def test_full_fine_tune_reloads_with_the_same_tokenizer_and_answers(tmp_path, meta, monkeypatch, source_behaviour):
    out = tmp_path / "run"
    trainer = _train(out, meta, monkeypatch)
    model, tokenizer = trainer.model, trainer.processing_class
    assert tokenizer_behaviour(tokenizer) == source_behaviour  # training did not change the tokenizer
    bundled = InternVLChatModel.from_pretrained(str(BUNDLED), dtype=torch.float32)
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), bundled.parameters())) > 0
    expected = _answers(model, tokenizer)
    _check_region_answers(expected)
    for directory in (out, out / "checkpoint-1"):
        reloaded_tokenizer = _check_tokenizer_dir(directory, source_behaviour)
        reloaded = InternVLChatModel.from_pretrained(str(directory), dtype=torch.float32)
        assert _answers(reloaded, reloaded_tokenizer) == expected, directory
    # the native-layout conversion carries the same tokenizer (the bundled model is ps_version v1, hence allow_v1)
    converted = convert_checkpoint_to_hf(out, tmp_path / "hf", allow_v1=True)
    _check_tokenizer_dir(converted, source_behaviour)


def test_lora_fine_tune_and_merge_keep_the_tokenizer_and_answers(tmp_path, meta, monkeypatch, source_behaviour):
    out = tmp_path / "run"
    trainer = _train(out, meta, monkeypatch, "--use_llm_lora", "4", "--freeze_llm", "True", "--freeze_backbone",
                     "True", "--freeze_mlp", "True", "--lora_dropout", "0.0")
    model, tokenizer = trainer.model, trainer.processing_class
    assert tokenizer_behaviour(tokenizer) == source_behaviour
    expected = _answers(model, tokenizer)
    _check_region_answers(expected)
    for directory in (out, out / "checkpoint-1"):
        _check_tokenizer_dir(directory, source_behaviour)
    adapter_model = InternVLChatModel.from_pretrained(str(BUNDLED), dtype=torch.float32)
    load_lora_run(adapter_model, out)
    assert _answers(adapter_model, load_tokenizer(out)) == expected

    merged_dir = tmp_path / "merged"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*MERGE, "--run_dir", str(out), "--output_dir", str(merged_dir)], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "to instantiate a model of type" not in result.stderr
    merged_tokenizer = _check_tokenizer_dir(merged_dir, source_behaviour)
    merged = InternVLChatModel.from_pretrained(str(merged_dir), dtype=torch.float32)
    bundled = InternVLChatModel.from_pretrained(str(BUNDLED), dtype=torch.float32)
    lm_diff = max((p - q).abs().max().item() for (n, p), q in
                  zip(merged.named_parameters(), bundled.parameters()) if n.startswith("language_model"))
    assert lm_diff > 0  # the step moved the adapters, so the merge changed the LLM
    assert _answers(merged, merged_tokenizer) == expected
