"""What the tests, the lab's GPU checks and users' own tests share: tiny tokenizers, tiny configs, toy datasets.

Nothing here downloads anything; everything is built from code in a few seconds. The pytest fixtures over these
builders are in `internvl.testing.fixtures` (imported by the conftests; it needs pytest, the rest does not).
"""
from .model import released_style_config_dict
from .square_task import BASE_PROMPT, QUESTION, iou, square_image, write_square_dataset
from .tokenizer import TINY_VOCAB_SIZE, build_tiny_tokenizer_dir, tiny_corpus

__all__ = ["BASE_PROMPT", "QUESTION", "TINY_VOCAB_SIZE", "build_tiny_tokenizer_dir", "iou",
           "released_style_config_dict", "square_image", "tiny_corpus", "write_square_dataset"]
