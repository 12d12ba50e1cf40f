"""Model FLOPs of one InternVL-Chat training step, for MFU.

The formula (stated in docs/performance.md and in every benchmark JSON):

    forward FLOPs = 2 * P_llm * T_llm                        (LLM matmuls; P_llm = linear weights of the decoder
                                                              layers, T_llm = real (non-padding) tokens)
                  + 2 * P_head * T_sup                       (LM head on the supervised next-token positions:
                                                              what the loss needs)
                  + 4 * d_attn * L_llm * sum_doc s(s+1)/2    (causal QK^T and AV over each sample's own tokens)
                  + n_img * [2 * P_vit * N_vit               (ViT matmuls over N_vit = patches + CLS tokens,
                             + 4 * C_vit * L_vit * N_vit^2    full attention,
                             + 2 * P_patch * N_patches        patch-embedding conv,
                             + 2 * P_mlp1 * N_img_tok]        projector on the image tokens)
    training step FLOPs = 3 * forward FLOPs                  (backward = 2 x forward; recomputation under gradient
                                                              checkpointing is not counted: model FLOPs, not
                                                              hardware FLOPs)

Both our model and the native baseline are charged the same "required" FLOPs for the same batch, so wasted work
(padding, a head over unsupervised positions) lowers MFU instead of inflating it. MFU = FLOPs / time / peak.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

#: dense bf16 tensor-core peak of an H100/H200 SXM (datasheet, without sparsity), FLOP/s.
H100_H200_BF16_PEAK = 989.4e12


def linear_params(module: nn.Module) -> int:
    """Number of weight entries of all nn.Linear layers inside `module` (biases are negligible and left out)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOPs formula needs, read off an InternVLChatModel (or given for a model never built)."""

    p_llm: int  # linear weights of the decoder layers
    p_head: int  # LM head weights (V * H)
    d_attn: int  # num_heads * head_dim of the LLM
    l_llm: int  # decoder layers
    p_vit: int  # linear weights of the ViT encoder
    c_vit: int  # ViT width
    l_vit: int  # ViT layers
    n_vit: int  # tokens per tile through the ViT (patches + CLS)
    p_patch: int  # patch-embedding conv weights (C * 3 * p * p)
    p_mlp1: int  # projector linear weights
    n_img_tok: int  # image tokens per tile after pixel shuffle

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def shape_of(model: nn.Module) -> ModelShape:
    """Read a ModelShape from an InternVLChatModel (meta-device models work: only shapes are read)."""
    cfg = model.config
    llm_cfg = cfg.llm_config
    vit_cfg = cfg.vision_config
    decoder = model.language_model.get_decoder()
    head = model.language_model.get_output_embeddings()
    head_dim = getattr(llm_cfg, "head_dim", None) or llm_cfg.hidden_size // llm_cfg.num_attention_heads
    patches = (vit_cfg.image_size // vit_cfg.patch_size) ** 2
    conv = model.vision_model.embeddings.patch_embedding
    return ModelShape(
        p_llm=linear_params(decoder.layers),
        p_head=head.in_features * head.out_features,
        d_attn=llm_cfg.num_attention_heads * head_dim,
        l_llm=llm_cfg.num_hidden_layers,
        p_vit=linear_params(model.vision_model.encoder),
        c_vit=vit_cfg.hidden_size,
        l_vit=vit_cfg.num_hidden_layers,
        n_vit=patches + 1,
        p_patch=conv.weight.numel(),
        p_mlp1=linear_params(model.mlp1),
        n_img_tok=int(model.num_image_token),
    )


def forward_flops(
    shape: ModelShape, *, tokens: int, supervised: int, doc_lengths: list[int], images: int
) -> float:
    """Forward FLOPs of one batch: `tokens` real LLM tokens, `supervised` next-token targets, per-sample lengths
    `doc_lengths` (each sample attends only to itself, packed or padded), `images` tiles through the ViT."""
    if tokens < 0 or supervised < 0 or images < 0 or any(s < 0 for s in doc_lengths):
        raise ValueError("token, supervision, document and image counts must be >= 0")
    attn_pairs = sum(s * (s + 1) // 2 for s in doc_lengths)
    llm = 2.0 * shape.p_llm * tokens + 2.0 * shape.p_head * supervised
    llm += 4.0 * shape.d_attn * shape.l_llm * attn_pairs
    patches = shape.n_vit - 1
    vit = (
        2.0 * shape.p_vit * shape.n_vit
        + 4.0 * shape.c_vit * shape.l_vit * shape.n_vit**2
        + 2.0 * shape.p_patch * patches
        + 2.0 * shape.p_mlp1 * shape.n_img_tok
    )
    return llm + images * vit


def train_step_flops(
    shape: ModelShape, *, tokens: int, supervised: int, doc_lengths: list[int], images: int
) -> float:
    """Model FLOPs of one full-parameter training step (forward + backward = 3 x forward)."""
    return 3.0 * forward_flops(shape, tokens=tokens, supervised=supervised, doc_lengths=doc_lengths, images=images)


def mfu(flops: float, seconds: float, peak: float = H100_H200_BF16_PEAK) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak."""
    if seconds <= 0 or peak <= 0:
        raise ValueError(f"seconds and peak must be > 0 (got {seconds}, {peak})")
    return flops / seconds / peak


def decode_weight_bytes(model: nn.Module) -> int:
    """Bytes of LLM weights read per decode step at batch 1: decoder layers + final norm + LM head (the input
    embedding table is only indexed, one row per token). Divided by memory bandwidth this is the step-time floor."""
    lm = model.language_model if hasattr(model, "language_model") else model
    decoder = lm.get_decoder()
    head = lm.get_output_embeddings()
    total = sum(p.numel() * p.element_size() for p in decoder.layers.parameters())
    total += sum(p.numel() * p.element_size() for p in decoder.norm.parameters())
    total += head.weight.numel() * head.weight.element_size()
    return int(total)


def lora_params(llm_config_or_chat, r: int) -> int:
    """Adapter weights of LoRA rank `r` on a Llama-family LLM's q/k/v/o and gate/up/down projections (the targets of
    `internvl.train.lora`): r * (in + out) per projection per layer. 0 when `r` is 0."""
    if not r:
        return 0
    c = getattr(llm_config_or_chat, "llm_config", llm_config_or_chat)
    h, inter = c.hidden_size, c.intermediate_size
    hd = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + inter) + (inter + h)
    return r * per_layer * c.num_hidden_layers


def recipe_step_flops(shape: ModelShape, *, tokens: int, supervised: int, doc_lengths: list[int], images: int,
                      lora: int = 0) -> float:
    """Model FLOPs of one training step of the released recipe: ViT and projector frozen, the LLM trained in full
    (`lora` = 0) or through LoRA adapters with `lora` weights in all (`lora_params`).

    Each matmul costs 2·W·n forward; backward costs another 2·W·n for the input gradient and 2·W·n for the weight
    gradient, and a frozen weight gets no weight-gradient FLOPs:
      - ViT + projector: forward only (1x): frozen, and nothing before them trains, so no gradient flows into them;
      - LLM linears: full 3x (6·P_llm·T); under LoRA the frozen base gets 2x (forward + input gradient, 4·P_llm·T)
        and the adapters 3x (6·P_lora·T);
      - LM head (on the supervised positions): 3x when the LLM trains in full, 2x under LoRA (frozen head);
      - attention scores (QK^T, AV): no weights, 3x (backward = dQ, dK, dV);
      - recomputation under gradient checkpointing is NOT counted (model FLOPs, not hardware FLOPs), so MFU is
        directly comparable with checkpointing off.
    Under LoRA the first layer's q/k/v base projections need no input gradient (their input, the embeddings, is
    frozen); they are still charged it (an overcount of 2·P_qkv(layer 0)·T, under 1/L of the base's backward).
    """
    if lora < 0:
        raise ValueError(f"lora adapter weights must be >= 0 (got {lora})")
    fwd = forward_flops(shape, tokens=tokens, supervised=supervised, doc_lengths=doc_lengths, images=0)
    vit = forward_flops(shape, tokens=0, supervised=0, doc_lengths=[], images=images)
    linear = 2.0 * shape.p_llm * tokens
    head = 2.0 * shape.p_head * supervised
    attn = fwd - linear - head
    weight_grad = 0.0 if lora else linear + head  # the full LLM's weight gradients (embedding: a lookup, no FLOPs)
    adapters = 3.0 * 2.0 * lora * tokens
    return vit + 2.0 * fwd + attn + weight_grad + adapters
