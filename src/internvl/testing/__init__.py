"""Builders the tests, the lab's GPU checks and users' own tests share, made from code in seconds (no downloads):
a tiny tokenizer and a toy dataset. Their pytest fixtures are in `internvl.testing.fixtures`."""
from .square_task import write_square_dataset
from .tokenizer import build_tiny_tokenizer_dir

__all__ = ["build_tiny_tokenizer_dir", "write_square_dataset"]
