#!/usr/bin/env python3
"""Create the *untrained* starting point of the bundled MedReg-mini model: tokenizer + config + random weights.

    python3 scripts/init_medreg_mini_model.py --data data/built/medreg_mini --out runs/medreg-mini-init

Then ``medrega-train --model_name_or_path runs/medreg-mini-init ...`` trains it on MedReg-mini (see docs/demo.md).

* Tokenizer: a SentencePiece BPE model trained on every MedReg-mini training text (English and Chinese prompts and
  answers, digits split one per token) with the ChatML and InternVL special tokens, through
  :func:`internvl.tokenization.train_sentencepiece_tokenizer` (the same layout as Nous-Hermes-2-Yi + InternVL).
* Model: the InternVL-Chat-V1.2 architecture (InternViT-6B-style encoder with RMSNorm and QK-norm, pixel shuffle v1,
  2-layer MLP projector, Llama LLM, Hermes-2 template) at small sizes: 224 px tile -> 16x16 patches -> 64 image
  tokens; ViT 6 x 192; LLM 6 x 384 (GQA 6/2). About 15M parameters, ~30 MB in bfloat16.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.model import InternVLChatConfig, InternVLChatModel
from internvl.tokenization import load_tokenizer, save_tokenizer, train_sentencepiece_tokenizer

MINI_CONFIG: dict = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "downsample_ratio": 0.5,
    "dynamic_image_size": False,
    "force_image_size": 224,
    "max_dynamic_patch": 1,
    "min_dynamic_patch": 1,
    "pad2square": False,
    "ps_version": "v1",
    "select_layer": -1,
    "template": "Hermes-2",
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "use_thumbnail": False,
    "tie_word_embeddings": False,
    "vision_config": {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "num_channels": 3,
        "patch_size": 14, "image_size": 224, "qkv_bias": False, "hidden_size": 192, "num_attention_heads": 6,
        "intermediate_size": 768, "qk_normalization": True, "num_hidden_layers": 6, "use_flash_attn": False,
        "hidden_act": "gelu", "norm_type": "rms_norm", "layer_norm_eps": 1e-06, "dropout": 0.0,
        "drop_path_rate": 0.0, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 0.1,
    },
    "llm_config": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 0, "hidden_size": 384,
        "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
        "hidden_act": "silu", "max_position_embeddings": 1024, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "attention_bias": False, "bos_token_id": 1, "eos_token_id": 4, "pad_token_id": 0,
        "initializer_range": 0.02, "tie_word_embeddings": False,
    },
}


def training_texts(data_dir: Path) -> list[str]:
    """Every human and gpt turn of the training jsonl files (the tokenizer never sees the test split)."""
    texts = []
    files = sorted((data_dir / "train").glob("*.jsonl"))
    if not files:
        raise SystemExit(f"{data_dir}/train: no jsonl files; run scripts/build_medreg_mini.py first")
    for path in files:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SystemExit(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
                for turn in rec["conversations"]:
                    texts.append(turn["value"].replace("<image>\n", "").replace("<image>", ""))
    return texts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=Path("data/built/medreg_mini"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--vocab-size", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)


    args.out.mkdir(parents=True, exist_ok=True)
    train_sentencepiece_tokenizer(training_texts(args.data), args.out, vocab_size=args.vocab_size,
                                  model_max_length=1024)
    tokenizer = load_tokenizer(args.out)
    config_dict = json.loads(json.dumps(MINI_CONFIG))
    config_dict["llm_config"]["vocab_size"] = len(tokenizer)
    config_dict["llm_config"]["eos_token_id"] = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = InternVLChatConfig(**config_dict)
    torch.manual_seed(args.seed)
    model = InternVLChatModel(config)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)
    model.save_pretrained(args.out, safe_serialization=True)
    save_tokenizer(tokenizer, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(args.out), "parameters": n, "vocab": len(tokenizer),
                      "num_image_token": model.num_image_token}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
