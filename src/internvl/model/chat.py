"""`chat()` / `batch_chat()` of InternVLChatModel: template rendering, `<image>` expansion, stop ids, decoding.

As the original: a first-turn question without `<image>` gets `"<image>\\n"` prepended when images are given; each
`<image>` becomes `<img>` + `<IMG_CONTEXT>` x (num_image_token x tiles) + `</img>`; generation stops on the
template's separator and other stop tokens the tokenizer holds as single tokens. The answer is decoded by
`internvl.tokenization.decode_answer` (region tags kept, every other control token removed).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig

from ..constants import IMG_CONTEXT_TOKEN
from ..image_processing import expand_image_placeholders, first_turn_with_images
from ..templates import ChatTemplate, get_template
from ..tokenization import decode_answer, token_id
from ..user_text import neutralize_control_tokens
from .devices import execution_device

DEFAULT_TEMPLATE = "Hermes-2"

History = list[tuple[str, str]]


def stop_token_ids(tokenizer: Any, template: ChatTemplate) -> list[int]:
    """Ids of the template's stop strings that the tokenizer holds as single tokens (separator first)."""
    ids: list[int] = []
    for text in (template.sep.strip(), *template.stop_strings):
        tid = token_id(tokenizer, text)
        if tid is not None and tid not in ids:
            ids.append(tid)
    if not ids:
        raise ValueError(
            f"the tokenizer knows none of the stop tokens of template {template.name!r} "
            f"({[template.sep.strip(), *template.stop_strings]}); add them before chatting"
        )
    return ids


def _generation_kwargs(generation_config: Mapping[str, Any] | GenerationConfig | None, eos: list[int]) -> dict:
    """Generation settings as kwargs for `generate`, with the template's stop ids as eos."""
    if generation_config is None:
        kwargs: dict[str, Any] = {"max_new_tokens": 512, "do_sample": False}
    elif isinstance(generation_config, GenerationConfig):
        kwargs = {"generation_config": generation_config}
    else:
        kwargs = dict(generation_config)
    kwargs["eos_token_id"] = eos
    return kwargs


class ChatMixin:
    """Adds `chat` and `batch_chat` to a model that has `generate`, `template`, `system_message`, `num_image_token`."""

    def _chat_template(self) -> ChatTemplate:
        return get_template(self.template or DEFAULT_TEMPLATE)

    def _render(self, template: ChatTemplate, history: History, question: str) -> str:
        """The prompt; conversation text is neutralised first, so it can never yield template or image tokens."""
        messages: list[dict[str, str]] = []
        for old_q, old_a in history:
            messages += [{"role": "user", "content": neutralize_control_tokens(old_q)},
                         {"role": "assistant", "content": neutralize_control_tokens(old_a)}]
        messages.append({"role": "user", "content": neutralize_control_tokens(question)})
        return template.render(messages, system_message=self.system_message, add_generation_prompt=True)

    def chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: Mapping[str, Any] | GenerationConfig | None = None,
        history: History | None = None,
        return_history: bool = False,
        num_patches_list: Sequence[int] | None = None,
        verbose: bool = False,
    ) -> str | tuple[str, History]:
        """Answer one question (optionally continuing `history`) about the tiles in pixel_values [T,3,S,S], through
        `batch_chat`; num_patches_list: tiles per image, in `<image>` order (default: one image of all T tiles).
        Returns the answer, or (answer, new history) with `return_history`."""
        question = first_turn_with_images(question, int(pixel_values is not None), history)
        if num_patches_list is None:
            num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
        history = [] if history is None else list(history)
        response = self.batch_chat(tokenizer, pixel_values, [question], generation_config, [list(num_patches_list)],
                                   verbose=verbose, histories=[history])[0]
        history.append((question, response))
        return (response, history) if return_history else response

    def batch_chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        questions: Sequence[str],
        generation_config: Mapping[str, Any] | GenerationConfig | None = None,
        num_patches_list: Sequence[int | Sequence[int]] | None = None,
        history: History | None = None,
        return_history: bool = False,
        verbose: bool = False,
        image_counts: Sequence[int] | None = None,
        histories: Sequence[History] | None = None,
    ) -> list[str]:
        """Answer several questions at once (left padding). num_patches_list[i]: the tiles of sample i (0 for text
        only), or a list of tile counts for several images; pixel_values stacks all tiles in order. histories[i]:
        sample i's earlier turns, as `chat(history=...)` takes them (`history` / `return_history` are refused here;
        `image_counts` is the original's alias of num_patches_list)."""
        if history is not None or return_history:
            raise NotImplementedError("batch_chat takes one history per question (histories=); chat() returns them")
        histories = [list(h) for h in histories] if histories is not None else [[] for _ in questions]
        if len(histories) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(histories)} histories")
        if image_counts is not None:
            num_patches_list = image_counts
        if num_patches_list is None:
            if pixel_values is not None and pixel_values.shape[0] != len(questions):
                raise ValueError("pass num_patches_list when samples have more than one tile")
            num_patches_list = [1 if pixel_values is not None else 0] * len(questions)
        if len(num_patches_list) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(num_patches_list)} num_patches_list entries")
        per_sample = [list(n) if isinstance(n, Sequence) else ([n] if n else []) for n in num_patches_list]
        total = sum(sum(n) for n in per_sample)
        if (pixel_values.shape[0] if pixel_values is not None else 0) != total:
            raise ValueError(f"num_patches_list asks for {total} tiles but pixel_values has "
                             f"{0 if pixel_values is None else pixel_values.shape[0]}")
        context_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
        if context_id is None:
            raise ValueError(
                f"the tokenizer has no {IMG_CONTEXT_TOKEN} token; call internvl.tokenization.add_special_tokens first"
            )
        self.img_context_token_id = context_id
        template = self._chat_template()
        queries = []
        for question, patches, past in zip(questions, per_sample, histories):
            question = first_turn_with_images(question, len(patches), past)
            query = self._render(template, past, question)
            queries.append(expand_image_placeholders(query, patches, self.num_image_token))
        eos = stop_token_ids(tokenizer, template)
        old_side, old_pad = tokenizer.padding_side, tokenizer.pad_token
        try:
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos[0])
            inputs = tokenizer(queries, return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = old_side
            if old_pad is None:
                tokenizer.pad_token = None
        gen_kwargs = _generation_kwargs(generation_config, eos)
        gen_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id if old_pad is not None else eos[0])
        if verbose:
            for query in queries:
                print(query.replace(IMG_CONTEXT_TOKEN * self.num_image_token, "<IMG_CONTEXT>*N"))
        device = execution_device(self.get_input_embeddings()) or torch.device("cpu")
        output = self.generate(pixel_values=pixel_values, input_ids=inputs["input_ids"].to(device),
                               attention_mask=inputs["attention_mask"].to(device), **gen_kwargs)
        return [decode_answer(tokenizer, row, separator=template.sep.strip()) for row in output]
