"""internvl.inference on the tiny model: batching equals one-by-one chat, text-only and multi-image requests,
save/load through load_model_and_tokenizer."""
import numpy as np
import pytest
import torch
from PIL import Image

from internvl.inference import (GenerationRequest, GenerationSettings, Generator, ModelLoadError,
                                load_model_and_tokenizer)
from internvl.model.loading import resolve_dtype


def _image(seed, size=(40, 30)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _requests(tmp_path):
    path = tmp_path / "scan.png"
    _image(3, (64, 48)).save(path)
    return [
        GenerationRequest("What organ is shown?", images=[_image(1)]),
        GenerationRequest("Answer the questions without an image."),
        GenerationRequest("Compare <image> and <image> please.", images=[_image(2), str(path)]),
        GenerationRequest("<image>\nPlease locate the liver in this CT scan.", images=[str(path)]),
    ]


def test_generator_batches_equal_single_chat(tiny_model, tiny_tokenizer, tmp_path):
    settings = GenerationSettings(max_new_tokens=6)
    reqs = _requests(tmp_path)
    one = Generator(tiny_model, tiny_tokenizer, settings, batch_size=1).generate(reqs)
    many = Generator(tiny_model, tiny_tokenizer, settings, batch_size=4).generate(reqs)
    assert one == many and len(one) == 4 and all(isinstance(a, str) for a in one)
    # batch of one equals the model's own chat() on the same inputs
    from internvl.image_processing import images_to_pixel_values

    pv, _ = images_to_pixel_values([reqs[0].images[0]], tiny_model.config)
    want = tiny_model.chat(tiny_tokenizer, pv, reqs[0].prompt, generation_config=settings.to_kwargs())
    assert one[0] == want


def test_generator_batches_cover_every_request_once(tiny_model, tiny_tokenizer, tmp_path):
    reqs = _requests(tmp_path)
    gen = Generator(tiny_model, tiny_tokenizer, GenerationSettings(max_new_tokens=3), batch_size=3)
    batches = list(gen.iter_generate(reqs))
    assert sorted(i for b in batches for i, _ in b) == [0, 1, 2, 3] and [len(b) for b in batches] == [3, 1]


def test_missing_image_is_a_clear_error(tiny_model, tiny_tokenizer, tmp_path):
    from internvl.data.images import ImageLoadError

    gen = Generator(tiny_model, tiny_tokenizer, GenerationSettings(max_new_tokens=2))
    with pytest.raises(ImageLoadError, match="nope.png"):
        gen.generate([GenerationRequest("x", images=[str(tmp_path / "nope.png")])])


def test_load_model_and_tokenizer_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    model, tok = load_model_and_tokenizer(tmp_path / "m", dtype="float32")
    assert not model.training and model.img_context_token_id == tiny_model.img_context_token_id
    settings = GenerationSettings(max_new_tokens=5)
    reqs = [GenerationRequest("What organ is shown?", images=[_image(1)])]
    assert Generator(model, tok, settings).generate(reqs) == Generator(tiny_model, tiny_tokenizer, settings).generate(reqs)
    moved, _ = load_model_and_tokenizer(tmp_path / "m", dtype="float32", device="meta")  # `device` places the model
    assert next(moved.parameters()).device.type == "meta"


def test_load_errors_and_dtype_names(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        load_model_and_tokenizer(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_and_tokenizer(tmp_path / "empty")
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("auto") == "auto"
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3")


def test_load_goes_through_model_loading(tiny_model, tiny_tokenizer, tmp_path, monkeypatch):
    """internvl.model.loading does the loading: its directory checks and its bitsandbytes check, as ModelLoadError."""
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_model_and_tokenizer(tmp_path / "pickled")
    tiny_model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"medrega-toolkit\[quant\]"):
        load_model_and_tokenizer(tmp_path / "m", load_in_4bit=True)
    model, _ = load_model_and_tokenizer(tmp_path / "m", dtype="bf16")
    assert next(model.parameters()).dtype is torch.bfloat16 and not model.training
