"""Token strings and numeric constants shared by the whole toolkit; no token ids (they depend on the tokenizer)."""
from __future__ import annotations

# Image block: ``<img>`` + N x ``<IMG_CONTEXT>`` + ``</img>``; N = num_image_token (256 for a 448 tile) x tiles.
IMG_START_TOKEN: str = "<img>"
IMG_END_TOKEN: str = "</img>"
IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>"

# Region grammar: ``<ref>name</ref><box>[[x1, y1, x2, y2], ...]</box>``; quads are reserved by InternVL (unused here).
REF_START: str = "<ref>"
REF_END: str = "</ref>"
BOX_START: str = "<box>"
BOX_END: str = "</box>"
QUAD_START: str = "<quad>"
QUAD_END: str = "</quad>"

# Where an image goes in record text before expansion (one per image, in order).
IMAGE_PLACEHOLDER: str = "<image>"

# ChatML tokens of the Yi / Nous-Hermes-2 tokenizer (ids 2, 6, 7, 8 in Yi).
ENDOFTEXT_TOKEN: str = "<|endoftext|>"
IM_START_TOKEN: str = "<|im_start|>"
IM_END_TOKEN: str = "<|im_end|>"
IM_SEP_TOKEN: str = "<|im_sep|>"
CHATML_TOKENS: tuple[str, ...] = (ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IM_SEP_TOKEN)

# Label value ignored by the loss (== torch.nn.CrossEntropyLoss default ignore_index, transformers LabelSmoother).
IGNORE_INDEX: int = -100

# Normalisation used by InternViT (ImageNet statistics), per RGB channel.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Box coordinates are integers in [0, BOX_SCALE]; pixel = v / BOX_SCALE * size (the original evaluators divide by 999).
BOX_SCALE: int = 999

# Default tile size of InternVL-Chat-V1.2 / MedRegA (256 image tokens: (448 / 14)^2 * 0.5^2).
DEFAULT_IMAGE_SIZE: int = 448

#: Modules that keep their dtype when the language model is quantised (8/4-bit loading, weight-only int8, QLoRA):
#: the vision tower, the projector and the LM head. Matched as transformers matches `llm_int8_skip_modules`
#: (`internvl.ops.int8_weights.in_skip_modules`).
SKIP_QUANT_MODULES: tuple[str, ...] = ("vision_model", "mlp1", "lm_head")
