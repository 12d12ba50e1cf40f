"""Small builders several test files share (a tiny BERT for BERTScore, an evaluation benchmark folder, a text-only
batch collator, decode prompts and their plain `generate` reference). Built from code in well under a second each."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence

__all__ = ["build_tiny_bert_dir", "write_eval_benchmark", "pad_text_batch", "decode_prompts", "greedy_reference"]


def build_tiny_bert_dir(directory: Path, words: Sequence[str], num_layers: int) -> Path:
    """A random BERT (hidden 16) with a word-level vocabulary of ``words`` saved as safetensors in ``directory``:
    what `--bertscore-model DIR` reads."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(directory)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=num_layers, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(directory, safe_serialization=True)
    return directory


def write_eval_benchmark(tmp_path: Path, model: Any, tokenizer: Any, rows: Sequence[dict], *, name: str, task: str,
                         pixels: Callable[[int], np.ndarray], extra_yaml: str = "") -> tuple[Path, Path, Path, Path]:
    """A `medrega-eval run` setup in ``tmp_path``: the model saved to ``model/``, one image ``imgs/{i}.png`` per row
    (``pixels(i)``, HxWx3 uint8), the rows as ``data/{name}.jsonl`` and a benchmark file registering ``name``.
    Returns (model dir, data dir, benchmark yaml, output dir)."""
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    for i in range(len(rows)):
        Image.fromarray(pixels(i)).save(data / "imgs" / f"{i}.png")
    (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yml = tmp_path / "bench.yaml"
    yml.write_text(f"benchmarks:\n  {name}:\n    task: {task}\n    annotation: {name}.jsonl\n    image_root: imgs\n"
                   + extra_yaml)
    return model_dir, data, yml, tmp_path / "out"


def pad_text_batch(batch: list[dict], extra_keys: Sequence[str] = ()) -> dict[str, torch.Tensor]:
    """Right-pad text-only samples (``input_ids``, ``labels`` lists) into a batch with an attention mask; labels pad
    with -100. ``extra_keys``: per-sample scalars stacked as they are (e.g. ``sample_index``)."""
    ids = pad_sequence([torch.tensor(b["input_ids"]) for b in batch], batch_first=True)
    labels = pad_sequence([torch.tensor(b["labels"]) for b in batch], batch_first=True, padding_value=-100)
    mask = pad_sequence([torch.ones(len(b["input_ids"]), dtype=torch.long) for b in batch], batch_first=True)
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    out.update({key: torch.tensor([b[key] for b in batch]) for key in extra_keys})
    return out


def decode_prompts(batch: int = 3, length: int = 7, hidden: int = 32,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds [B, L, H], attention mask [B, L]) with left padding on rows 0 (3 positions) and 1 (1)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, length, hidden, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, :3] = 0
    mask[1, :1] = 0
    return emb, mask


def greedy_reference(lm: Any, emb: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """transformers' own greedy `generate` of ``n`` tokens (no EOS stop): the reference the fast decoders must equal."""
    return lm.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                       pad_token_id=0)


def shard_like_accelerate(model: Any, head_unit: str = "tail") -> None:
    """FSDP2 (`fully_shard`, a process group must exist) as accelerate's `fsdp2_prepare_model` builds it for
    `ENGINE=fsdp2` (accelerate 1.16): each checkpointing layer, the input embedding, the [final norm, LM head] tail as
    one unit with `reshard_after_forward=False`, then the root. `head_unit="reshards"`: the LM head alone in a unit
    that reshards after its forward (another config's choice)."""
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    for layer in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]:
        fully_shard(layer)
    llm = model.language_model
    fully_shard(llm.get_input_embeddings())
    if head_unit == "tail":
        fully_shard([llm.get_decoder().norm, llm.get_output_embeddings()], reshard_after_forward=False)
    else:
        fully_shard(llm.get_output_embeddings(), reshard_after_forward=True)
    fully_shard(model)
