"""Shared pytest configuration: fixtures live in tests/fixtures/ and are registered here."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["fixtures.tokenizer", "fixtures.model"]
