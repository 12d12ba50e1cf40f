"""Chat templates kept as data (``templates/*.json``) and the one renderer of the original ``conversation.py``'s MPT
style: ``system_template.format(system_message) + sep``, then ``role + content + sep`` per message, then the assistant
role as generation prompt. Messages use the chat form (``role``/``content``) or the record form (``from``/``value``),
user first, alternating.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

__all__ = ["ChatTemplate", "TemplateError", "get_template", "normalize_messages"]

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class TemplateError(ValueError):
    """An unknown template name, a bad template file, or a message with a role the template does not know."""


def normalize_messages(messages: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """Messages in chat or record form -> ``[(role, text)]`` (roles ``user``/``assistant``). Roles
    and alternation are checked where conversations enter (``internvl.data.records.RecordChecker``; ``chat()``
    builds its own); an unknown role is a :class:`TemplateError` naming the message."""
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role", msg.get("from"))
        if role not in _ROLES:
            raise TemplateError(f"message {i}: unknown role {role!r} (expected human/gpt/user/assistant)")
        out.append((_ROLES[role], msg.get("content", msg.get("value", ""))))
    return out


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation template (see the module docstring for the rendering rule)."""

    name: str
    system_template: str
    system_message: str
    user_role: str
    assistant_role: str
    sep: str
    label_sep: str
    stop_strings: tuple[str, ...]
    description: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ChatTemplate":
        """Build from the JSON layout of ``templates/*.json`` (files are checked where they load, ``_load_file``)."""
        return cls(name=data["name"], system_template=data["system_template"], system_message=data["system_message"],
                   user_role=data["roles"]["user"], assistant_role=data["roles"]["assistant"], sep=data["sep"],
                   label_sep=data["label_sep"], stop_strings=tuple(data["stop_strings"]),
                   description=data.get("description", ""))

    def segments(self, messages: Sequence[Mapping[str, str]], system_message: str | None = None
                 ) -> list[tuple[str, bool]]:
        """The rendered conversation (without generation prompt) as ``(text, supervised)`` pieces, for labels: each
        answer plus ``label_sep`` is supervised, the rest is not."""
        system = self.system_message if system_message is None else system_message
        pieces: list[tuple[str, bool]] = [(self.system_template.format(system_message=system) + self.sep, False)]
        tail = self.sep[len(self.label_sep):]
        for role, text in normalize_messages(messages):
            if role == "user":
                pieces.append((self.user_role + text + self.sep, False))
            else:
                pieces.append((self.assistant_role, False))
                pieces.append((text + self.label_sep, True))
                if tail:
                    pieces.append((tail, False))
        return pieces

    def render(self, messages: Sequence[Mapping[str, str]], system_message: str | None = None,
               add_generation_prompt: bool | None = None) -> str:
        """The prompt string; ``add_generation_prompt`` appends the assistant role (None: when the last message is a
        user turn)."""
        text = "".join(piece for piece, _ in self.segments(messages, system_message))
        if add_generation_prompt is None:
            add_generation_prompt = bool(messages) and normalize_messages(messages[-1:])[0][0] == "user"
        return text + self.assistant_role if add_generation_prompt else text


def _load_file(path: Any) -> ChatTemplate:
    """One template file; :class:`TemplateError` naming it when it is not valid JSON in the layout, or breaks what
    the renderer relies on (``label_sep`` a prefix of ``sep``, a ``{system_message}`` slot, non-empty stop strings)."""
    where = f"internvl/templates/{path.name}"
    try:
        tpl = ChatTemplate.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as exc:
        raise TemplateError(f"{where}: not a template file ({type(exc).__name__}: {exc})") from None
    if not tpl.sep.startswith(tpl.label_sep) or "{system_message}" not in tpl.system_template:
        raise TemplateError(f"{where}: label_sep must be a prefix of sep and system_template needs {{system_message}}")
    if not tpl.stop_strings or not all(isinstance(stop, str) and stop for stop in tpl.stop_strings):
        raise TemplateError(f"{where}: stop_strings must be a non-empty list of non-empty strings")
    return tpl


@lru_cache(maxsize=None)
def _load_all() -> dict[str, ChatTemplate]:
    templates: dict[str, ChatTemplate] = {}
    for path in sorted(p for p in resources.files(__package__).iterdir() if p.name.endswith(".json")):
        tpl = _load_file(path)
        if tpl.name in templates:
            raise TemplateError(f"internvl/templates/{path.name}: a second template named {tpl.name!r}")
        templates[tpl.name] = tpl
    return templates


def get_template(name: str) -> ChatTemplate:
    """The template called ``name`` (e.g. ``"Hermes-2"``, ``"internvl2_5"``); :class:`TemplateError` lists the known
    names otherwise."""
    templates = _load_all()
    if name not in templates:
        raise TemplateError(f"unknown chat template {name!r}; known: {sorted(templates)}")
    return templates[name]
