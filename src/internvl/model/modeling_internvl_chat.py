"""InternVLChatModel: InternViT + pixel shuffle + `mlp1` + any transformers causal LM (Llama/Yi for V1.2/MedRegA).

State-dict prefixes are the attribute names of the original: `vision_model.*` (InternViT), `mlp1.{0,1,3}.*`
(LayerNorm, Linear, GELU, Linear) and `language_model.*` (a stock `*ForCausalLM`, e.g. `language_model.model.layers.N...`,
`language_model.lm_head.weight`).

Data flow of `forward` (T tiles, 256 tokens per 448 tile for V1.2):
  pixel_values [T,3,448,448] -> ViT hidden state `select_layer` [T,1025,3200] -> drop CLS -> [T,32,32,3200]
  -> pixel shuffle [T,16,16,12800] (v1: column-major token order) -> [T,256,12800] -> mlp1 -> [T,256,7168]
  -> tiles with image_flags == 1 overwrite, in order, the embeddings of the `<IMG_CONTEXT>` tokens of input_ids.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import ModelOutput

from ..ops.cross_entropy import causal_lm_loss
from .chat import ChatMixin
from .configuration_internvl_chat import InternVLChatConfig
from .decode_config import (
    DecodeConfig,
    greedy_settings,
    has_training_compiled_layers,
    single_device,
    trim_after_eos,
)
from .devices import execution_device
from .modeling_intern_vit import InternVisionModel


class ImageTokenMismatchError(ValueError):
    """The number of `<IMG_CONTEXT>` tokens in input_ids differs from the number of image features."""


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5, version: str = "v1") -> torch.Tensor:
    """Space-to-depth of a ViT feature grid, exactly as the original `InternVLChatModel.pixel_shuffle`.

    x: [N, A, B, C] (A rows, B columns of patches) -> [N, A*s, B*s, C/s^2] for s = `scale_factor`; each output vector
    concatenates a 2x2 block (for s = 0.5). `"v2"` returns the blocks row-major; `"v1"` (InternVL-Chat-V1.2, MedRegA)
    skips the final swap, so flattening the grid lists blocks column-major.
    """
    if version not in ("v1", "v2"):
        raise ValueError(f"pixel_shuffle version must be 'v1' or 'v2', got {version!r}")
    n, w, h, c = x.size()
    if int(h * scale_factor) != h * scale_factor or int(w * scale_factor) != w * scale_factor:
        raise ValueError(f"pixel_shuffle: grid {w}x{h} is not divisible by 1/{scale_factor}")
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class InternVLChatModel(ChatMixin, PreTrainedModel):
    """The InternVL-Chat model (V1.2 / MedRegA layout); see the module docstring for shapes.

    `img_context_token_id` is not part of the config (as in the original): `chat`/`batch_chat` read it from the
    tokenizer, training code must set `model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")`.
    """

    config_class = InternVLChatConfig
    config: InternVLChatConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["InternVisionEncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # Trainer: False keeps the original per-micro-batch token mean; True passes `num_items_in_batch` in
    accepts_loss_kwargs = False

    def __init__(
        self,
        config: InternVLChatConfig,
        vision_model: InternVisionModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        self.template = config.template
        self.system_message = config.system_message
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = config.num_image_token
        self.img_context_token_id: int | None = None
        # greedy `generate` on one CUDA device runs `fast_generate`'s decoder with `decode_config`; False =
        # transformers' generate; "always" = also on the CPU (tests)
        self.fast_generate: bool | str = True
        self.decode_config = DecodeConfig()

        self.vision_model = vision_model if vision_model is not None else InternVisionModel(config.vision_config)
        if language_model is None:
            language_model = AutoModelForCausalLM.from_config(config.llm_config)
        self.language_model = language_model

        vit_hidden = config.vision_config.hidden_size * round(1 / config.downsample_ratio) ** 2
        llm_hidden = config.llm_config.hidden_size
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vit_hidden),
            nn.Linear(vit_hidden, llm_hidden),
            nn.GELU(),
            nn.Linear(llm_hidden, llm_hidden),
        )
        self.post_init()

    # ----- embeddings plumbing (lets transformers resize / tie / enable_input_require_grads) -----
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    # ----- vision -----
    def pixel_shuffle(self, x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
        """Pixel shuffle with this model's `ps_version` (see the module-level `pixel_shuffle`)."""
        return pixel_shuffle(x, scale_factor, self.ps_version)

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T,3,S,S] -> projected image tokens [T, num_image_token, llm_hidden]."""
        patch = self.vision_model.embeddings.patch_embedding
        pixel_values = pixel_values.to(device=execution_device(patch) or execution_device(self.vision_model.embeddings)
                                       or pixel_values.device, dtype=patch.weight.dtype)
        vit_embeds = self.vision_model.layer_output(pixel_values, self.select_layer)
        vit_embeds = vit_embeds[:, 1:, :]
        side = int(vit_embeds.shape[1] ** 0.5)
        if side * side != vit_embeds.shape[1]:
            raise ValueError(f"extract_feature: {vit_embeds.shape[1]} patch tokens do not form a square grid")
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = self.pixel_shuffle(vit_embeds, scale_factor=self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        device = execution_device(self.mlp1[0]) or execution_device(self.mlp1)
        return self.mlp1(vit_embeds.to(device) if device is not None else vit_embeds)

    def _require_img_context_id(self) -> int:
        if self.img_context_token_id is None:
            raise ValueError(
                "img_context_token_id is not set: set model.img_context_token_id = "
                "tokenizer.convert_tokens_to_ids('<IMG_CONTEXT>') (chat()/batch_chat() do this themselves)"
            )
        return int(self.img_context_token_id)

    def image_token_mismatch(self, n_tokens: int, real_tiles: int, what: str = "") -> ImageTokenMismatchError | None:
        """The image-token count check, from counts already on the host: None when `n_tokens` `<IMG_CONTEXT>` tokens
        match `real_tiles` (image_flags == 1) x num_image_token, else the error to raise (prefixed by `what`)."""
        n_features = real_tiles * self.num_image_token
        if n_tokens == n_features:
            return None
        prefix = f"{what}: " if what else ""
        return ImageTokenMismatchError(
            f"{prefix}input_ids hold {n_tokens} <IMG_CONTEXT> tokens (id {self._require_img_context_id()}) but the "
            f"images give {n_features} features ({real_tiles} tiles x {self.num_image_token}); were image tokens "
            "truncated by max_seq_length, or do num_patches_list / image_flags not match the prompt?"
        )

    def merge_image_embeddings(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, vit_all: torch.Tensor,
        image_flags: torch.Tensor | None = None, *, check: bool = True,
    ) -> torch.Tensor:
        """Overwrite the `<IMG_CONTEXT>` positions of inputs_embeds [B,L,H] by the features of the real tiles of
        vit_all [T,N,H] (image_flags [T] == 1; all tiles when None), in order. Returns [B,L,H].

        `check` reads the counts back once and raises `ImageTokenMismatchError` unless the context tokens are
        (real tiles) x N; `check=False` reads nothing back (the caller checked with `image_token_mismatch`). The merge
        has static shapes (real tiles sorted first, the k-th context position gathers row cumsum(mask) - 1); dummy
        tiles touch every vision/projector parameter with weight 0, so DDP/ZeRO-3 see the same parameters on every rank.
        """
        token_id = self._require_img_context_id()
        mask = (input_ids == token_id).to(inputs_embeds.device)
        dummy = None
        if image_flags is not None:
            dummy = image_flags.reshape(-1).to(vit_all.device) != 1
            if dummy.shape[0] != vit_all.shape[0]:
                raise ValueError(f"image_flags has {dummy.shape[0]} entries for {vit_all.shape[0]} tiles")
        if check:
            real_tiles = (~dummy).sum() if dummy is not None else torch.tensor(vit_all.shape[0])
            n_tokens, n_real = torch.stack([mask.sum(), real_tiles.to(mask.device)]).tolist()
            error = self.image_token_mismatch(n_tokens, n_real)
            if error is not None:
                raise error
        features = vit_all
        if dummy is not None:
            features = vit_all.index_select(0, torch.argsort(dummy.to(torch.int8), stable=True))
            unused = (vit_all * dummy.to(vit_all.dtype)[:, None, None]).sum() * 0.0
            inputs_embeds = inputs_embeds + unused.to(inputs_embeds.device, inputs_embeds.dtype)
        features = features.reshape(-1, features.shape[-1]).to(device=inputs_embeds.device, dtype=inputs_embeds.dtype)
        if features.shape[0] == 0:
            return inputs_embeds
        row = (mask.reshape(-1).cumsum(0) - 1).clamp(0, features.shape[0] - 1)
        gathered = features.index_select(0, row).reshape(inputs_embeds.shape)
        return torch.where(mask.unsqueeze(-1), gathered, inputs_embeds)

    def _embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_flags: torch.Tensor | None,
        sync_free: bool = False,
    ) -> torch.Tensor:
        """Token embeddings with image features merged in: [B, L, H] (`sync_free`: see `forward`)."""
        embed = self.language_model.get_input_embeddings()
        device = execution_device(embed)
        inputs_embeds = embed(input_ids.to(device) if device is not None else input_ids)
        if pixel_values is None:
            return inputs_embeds
        return self.merge_image_embeddings(input_ids, inputs_embeds, self.extract_feature(pixel_values), image_flags,
                                           check=not sync_free)

    # ----- training / scoring -----
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        image_flags: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        loss_weight: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        sync_free: bool = False,
        **kwargs,
    ) -> ModelOutput:
        """Multimodal causal-LM forward: the LLM's output (logits [B,L,V], cache, ...) with `loss` set.

        pixel_values [T,3,S,S] with image_flags [T] (1 = real tile, 0 = dummy tile of a text-only sample); input_ids
        [B,L] holding T_real*num_image_token `<IMG_CONTEXT>` tokens. Packed rows: attention_mask=None and position_ids
        restarting at 0 per sample. Loss: `internvl.ops.causal_lm_loss` on the logits. Other kwargs go to the language
        model. `sync_free`: merge the image features without a host read (CUDA-graph capture, `lab.graph_step`).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("forward needs input_ids (or inputs_embeds)")
            inputs_embeds = self._embed(input_ids, pixel_values, image_flags, sync_free=sync_free)
        elif pixel_values is not None:
            raise ValueError("pass either inputs_embeds or pixel_values + input_ids, not both")
        if labels is not None or (attention_mask is None and position_ids is not None):
            # no KV cache when training or scoring packed rows (transformers only detects packing without a cache)
            kwargs.setdefault("use_cache", False)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        loss = None
        if labels is not None:
            loss = causal_lm_loss(outputs.logits, None, labels, loss_weight=loss_weight,
                                  num_items_in_batch=num_items_in_batch)
        fields = {k: v for k, v in outputs.items() if k != "loss"}
        return type(outputs)(loss=loss, **fields)

    # ----- generation -----
    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor:
        """Generate from text with images merged in (left-padded prompts); returns only the new tokens [B, new].
        Plain greedy decoding runs the static-cache decoder (`fast_generate`), everything else the language model's
        own `generate` on the merged embeddings."""
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # everything the host reads is read here, in one sync before any GPU work is queued
        has_images = pixel_values is not None
        token_id = self._require_img_context_id() if has_images else -1
        n_tokens, left_padded, padded = torch.stack([
            (input_ids == token_id).sum().to(attention_mask.device), attention_mask[:, -1].all().long(),
            (attention_mask == 0).any().long()]).tolist()
        if has_images:
            if n_tokens == 0:
                raise ImageTokenMismatchError(
                    f"images were given but input_ids contain no <IMG_CONTEXT> token (id {token_id})"
                )
            error = self.image_token_mismatch(n_tokens, pixel_values.shape[0])
            if error is not None:
                raise error
        fast = generate_kwargs.pop("fast_generate", None)
        fast = self.fast_generate if fast is None else fast
        inputs_embeds = self._embed(input_ids, pixel_values, None, sync_free=True)
        attention_mask = attention_mask.to(inputs_embeds.device)
        if fast == "always" or (fast and inputs_embeds.is_cuda):
            # imported on first use: the decoder imports Triton (~0.5 s) and registers its custom ops
            from .fast_generate import decoder_for

            settings = None
            if (left_padded and (fast == "always" or single_device(self.language_model))
                    and not has_training_compiled_layers(self.language_model)):
                config = generation_config or self.language_model.generation_config
                settings = greedy_settings(dict(generate_kwargs, generation_config=config),
                                           self.language_model.generation_config.eos_token_id)
            if settings is not None:
                decoder = decoder_for(self.language_model, self.decode_config)
                tokens = decoder.generate(inputs_embeds, attention_mask, padded=bool(padded), **settings)
                return trim_after_eos(tokens, settings["eos_token_id"], settings["pad_token_id"])
        generate_kwargs.setdefault("use_cache", True)
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            **generate_kwargs,
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> InternVLChatModel:
        """transformers' loader, local safetensors only, never remote code (`loading.load_pretrained` adds the checks
        and the bf16 / device_map / 8-bit / 4-bit conveniences)."""
        if kwargs.get("trust_remote_code"):
            raise ValueError("InternVLChatModel is implemented locally; trust_remote_code is never needed or used")
        kwargs.pop("trust_remote_code", None)
        kwargs.setdefault("local_files_only", True)
        kwargs.setdefault("use_safetensors", True)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
