"""Shared pytest configuration: the tiny tokenizer/model fixtures come from `internvl.testing.fixtures`."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from internvl.testing.fixtures import tiny_config, tiny_model, tiny_tokenizer, tiny_tokenizer_dir  # noqa: E402,F401
