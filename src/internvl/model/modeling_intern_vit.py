"""InternViT: the vision tower of InternVL-Chat, state-dict compatible with the released checkpoints.

Keys (per block i): `embeddings.{class_embedding, patch_embedding.weight/bias, position_embedding}`,
`encoder.layers.{i}.attn.qkv.weight[/bias]`, `attn.q_norm.weight`, `attn.k_norm.weight` (6B only),
`attn.proj.weight/bias`, `mlp.fc1/fc2.weight/bias`, `norm1/norm2.weight[/bias]`, `ls1`, `ls2`.  No final norm.

Maths reproduced from the original: pre-norm blocks `x + drop_path(attn(norm1(x)) * ls1)` then
`x + drop_path(mlp(norm2(x)) * ls2)`; QK-norm is one RMSNorm over the full width applied to q and k before the head
split; the position embedding is bicubically interpolated in fp32 when the patch grid differs from the stored one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from .configuration_intern_vit import InternVisionConfig

#: RMSNorm computed in fp32 and cast back before the weight multiply, as the original `InternRMSNorm`: the same maths
#: (and `weight` / `variance_epsilon` attributes) as transformers' Llama RMSNorm, so that class serves.
InternRMSNorm = LlamaRMSNorm

NORM2FN = {"rms_norm": InternRMSNorm, "layer_norm": nn.LayerNorm}


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (timm semantics, survivors rescaled by 1/keep)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def _resample_grid(pos: torch.Tensor, grid: int, height: int, width: int) -> torch.Tensor:
    """Patch position embeddings [1, grid*grid, C] of a square grid resampled to [1, height*width, C]: bicubic
    (align_corners=False) in fp32, as the original, returned in `pos`'s dtype."""
    out = pos.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    out = F.interpolate(out, size=(height, width), mode="bicubic", align_corners=False)
    return out.reshape(1, -1, height * width).permute(0, 2, 1).to(pos.dtype)


class InternVisionEmbeddings(nn.Module):
    """CLS token + Conv2d patch embedding (stride = patch) + learned absolute position embedding."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, self.embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, self.embed_dim))

    def _patch_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """Position embedding of the patch tokens for a `height` x `width` grid: [1, height*width, C], resampled from
        the stored square grid (returned as is when it matches: bicubic at scale 1 is the identity)."""
        pos = self.position_embedding[:, 1:, :]
        grid = self.image_size // self.patch_size
        if height == grid and width == grid:
            return pos
        return _resample_grid(pos, grid, height, width)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] -> embeddings [B, 1 + (H/14)*(W/14), C] (CLS first, patches row-major)."""
        target_dtype = self.patch_embedding.weight.dtype
        patch_embeds = self.patch_embedding(pixel_values.to(target_dtype))
        batch_size, _, height, width = patch_embeds.shape
        patch_embeds = patch_embeds.flatten(2).transpose(1, 2)
        class_embeds = self.class_embedding.expand(batch_size, 1, -1).to(target_dtype)
        embeddings = torch.cat([class_embeds, patch_embeds], dim=1)
        position_embedding = torch.cat(
            [self.position_embedding[:, :1, :], self._patch_pos_embed(height, width)], dim=1
        )
        return embeddings + position_embedding.to(target_dtype)


class InternAttention(nn.Module):
    """Multi-head self-attention with a fused `qkv` Linear, optional full-width QK RMSNorm and SDPA (its cuDNN kernel
    beat flash-attn's on the ViT's shapes, docs/performance.md, so `config.use_flash_attn` is ignored)."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.attn_drop = float(config.attention_dropout)
        self.proj_drop = nn.Dropout(config.dropout)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N, C]; no mask (every tile is a full grid)."""
        b, n, c = hidden_states.shape
        q, k, v = self.qkv(hidden_states).split(c, dim=-1)  # rows [0:C]=q, [C:2C]=k, [2C:3C]=v
        if self.qk_normalization:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = q.reshape(b, n, self.num_heads, self.head_dim)
        k = k.reshape(b, n, self.num_heads, self.head_dim)
        v = v.reshape(b, n, self.num_heads, self.head_dim)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout, scale=self.scale
        ).transpose(1, 2)
        out = self.proj(out.reshape(b, n, c))
        return self.proj_drop(out)


class InternMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


class InternVisionEncoderLayer(GradientCheckpointingLayer):
    """One pre-norm block with layer scale (`ls1`, `ls2`) and drop path."""

    def __init__(self, config: InternVisionConfig, drop_path_rate: float) -> None:
        super().__init__()
        self.embed_dim = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = NORM2FN[config.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.norm2 = NORM2FN[config.norm_type](self.embed_dim, eps=config.layer_norm_eps)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(self.embed_dim))
        self.drop_path_rate = float(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attn_out = self.attn(self.norm1(hidden_states).to(hidden_states.dtype)) * self.ls1
        hidden_states = hidden_states + drop_path(attn_out, self.drop_path_rate, self.training)
        mlp_out = self.mlp(self.norm2(hidden_states).to(hidden_states.dtype)) * self.ls2
        return hidden_states + drop_path(mlp_out, self.drop_path_rate, self.training)


class InternVisionEncoder(nn.Module):
    """Stack of `num_hidden_layers` blocks; drop-path rates rise linearly from 0 to `drop_path_rate`."""

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__()
        self.config = config
        rates = torch.linspace(0, float(config.drop_path_rate), config.num_hidden_layers, device="cpu").tolist()
        self.layers = nn.ModuleList(
            [InternVisionEncoderLayer(config, rates[i]) for i in range(config.num_hidden_layers)]
        )
        self.gradient_checkpointing = False

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        output_hidden_states: bool = False,
        num_layers: int | None = None,
    ) -> BaseModelOutput:
        """Run the first `num_layers` blocks (all by default); hidden_states (when asked for) is (embeddings, output of
        block 1, ..., output of block num_layers)."""
        hidden_states = inputs_embeds
        all_states: list[torch.Tensor] | None = [hidden_states] if output_hidden_states else None
        for layer in self.layers[: num_layers if num_layers is not None else len(self.layers)]:
            hidden_states = layer(hidden_states)
            if all_states is not None:
                all_states.append(hidden_states)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=tuple(all_states) if all_states is not None else None
        )


class InternVisionModel(PreTrainedModel):
    """InternViT (6B- or 300M-style by config).  `forward` returns the last hidden state with the CLS token first."""

    config_class = InternVisionConfig
    config: InternVisionConfig
    base_model_prefix = "vision_model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: InternVisionConfig) -> None:
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, InternVisionEmbeddings):
            init.trunc_normal_(module.class_embedding, mean=0.0, std=std)
            init.trunc_normal_(module.position_embedding, mean=0.0, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            init.constant_(module.ls1, self.config.initializer_factor)
            init.constant_(module.ls2, self.config.initializer_factor)

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    def resize_pos_embeddings(self, old_size: int, new_size: int, patch_size: int) -> None:
        """Permanently resample the stored position grid from `old_size` to `new_size` pixels (bicubic, fp32), for
        training at a `force_image_size` other than the ViT's own `image_size`."""
        pos = self.embeddings.position_embedding
        cls_pos, patch_pos = pos[:, :1, :], pos[:, 1:, :]
        new = new_size // patch_size
        grid = _resample_grid(patch_pos, old_size // patch_size, new, new)
        self.embeddings.position_embedding = nn.Parameter(torch.cat([cls_pos, grid], dim=1))
        self.embeddings.image_size = new_size
        self.embeddings.num_patches = new * new
        self.config.image_size = new_size

    def layer_output(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden state `hidden_states[select_layer]` ([T, 1+patches, C]) running only the blocks it needs; indexes
        (embeddings, block 1, ..., block L) like the original's tuple (-1: the last block)."""
        total = len(self.encoder.layers) + 1
        index = select_layer + total if select_layer < 0 else select_layer
        if not 0 <= index < total:
            raise ValueError(f"select_layer {select_layer} is out of range for a ViT with {total - 1} blocks")
        embeds = self.embeddings(pixel_values)
        return self.encoder(embeds, num_layers=index).last_hidden_state

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        """pixel_values [T, 3, S, S] -> last_hidden_state [T, 1 + (S/14)^2, C]; pooler_output is the CLS state."""
        output_hidden_states = bool(output_hidden_states)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        embeds = self.embeddings(pixel_values)
        enc = self.encoder(embeds, output_hidden_states=output_hidden_states)
        last = enc.last_hidden_state
        out = BaseModelOutputWithPooling(
            last_hidden_state=last, pooler_output=last[:, 0, :], hidden_states=enc.hidden_states
        )
        return out if return_dict else out.to_tuple()
