"""The tiny preset learns a trivially learnable Text-to-Region task on CPU through `medrega-train`: the loss falls
and boxes generated for held-out images overlap the true square (IoU > 0.5)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from internvl.data.encode import apply_prompt_order
from internvl.image_processing import images_to_pixel_values
from internvl.model import InternVLChatModel
from internvl.regions import box_iou, box_to_pixels, parse_regions
from internvl.tokenization import load_tokenizer
from internvl.train.cli import main

from internvl.testing.square_task import BASE_PROMPT, QUESTION, square_image, write_square_dataset

SIZE = 56


@pytest.mark.slow
def test_tiny_preset_learns_text_to_region(tmp_path, tiny_tokenizer_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta = write_square_dataset(tmp_path / "data", n=64, seed=0, size=SIZE)
        out = tmp_path / "run"
        code = main(["--preset", "tiny", "--tokenizer_path", str(tiny_tokenizer_dir), "--meta_path", str(meta),
                     "--output_dir", str(out), "--max_steps", "300", "--per_device_train_batch_size", "8",
                     "--learning_rate", "3e-3", "--warmup_steps", "20", "--lr_scheduler_type", "cosine",
                     "--weight_decay", "0.0", "--save_strategy", "no", "--logging_steps", "20", "--use_cpu", "True",
                     "--seed", "0", "--disable_tqdm", "True", "--report_to", "none", "--grad_checkpoint", "False",
                     "--max_seq_length", "256", "--force_image_size", str(SIZE)])
        assert code == 0
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        curve = [e["loss"] for e in history if "loss" in e]
        assert curve[-1] < 0.2 * curve[0], curve

        model = InternVLChatModel.from_pretrained(str(out)).eval()
        tokenizer = load_tokenizer(out)
        question = apply_prompt_order([{"from": "human", "value": QUESTION}, {"from": "gpt", "value": ""}], 1,
                                      BASE_PROMPT)[0]["value"]
        rng = random.Random(2024)  # held-out images: a seed the training set did not use
        scores = []
        for _ in range(20):
            image, truth = square_image(rng, SIZE)
            pixel_values, _ = images_to_pixel_values([image], model.config)
            answer = model.chat(tokenizer, pixel_values, question, {"max_new_tokens": 40, "do_sample": False})
            regions = parse_regions(answer, strict=False)
            predicted = box_to_pixels(regions[0].boxes[0], SIZE, SIZE) if regions and regions[0].boxes else None
            scores.append(float(box_iou([predicted], [truth])[0, 0]) if predicted else 0.0)
    finally:
        torch.set_num_threads(threads)
    hits = sum(s > 0.5 for s in scores)
    assert sum(scores) / len(scores) > 0.5, scores
    assert hits >= 14, scores
