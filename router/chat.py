"""Chat messages to prompt text, through the checkpoint's chat template.

A template is code that came with a checkpoint: it is rendered in Jinja2's immutable sandbox (no attribute
access to Python internals, no mutation of what it is given). The environment follows what Hugging Face's
`apply_chat_template` gives a template (trimmed blocks, `raise_exception`, `strftime_now`, the special tokens
as strings), so the text, and so the tokens, are the ones `transformers` makes of the same messages.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from baton.engine import InvalidRequest

_ROLES = {"system", "developer", "user", "assistant", "tool"}


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def find_template(folder: Path, config: dict[str, Any], override: Path | None = None) -> str | None:
    """The template text: `override` (--chat-template), else `chat_template` in tokenizer_config.json (a
    string, or a list of named templates of which "default" is used), else chat_template.jinja."""
    if override is not None:
        return Path(override).read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    path = folder / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str


def parse_messages(value: Any) -> list[Message]:
    """OpenAI `messages`: each a role and its content, a string or a list of text parts. Raises InvalidRequest
    naming the field (`messages`, `messages[2].content`, ...)."""
    if not isinstance(value, list) or not value:
        raise InvalidRequest("messages", "must be a non-empty list of messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(where, "must be an object with a role and a content")
        role = m.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"{where}.role", f"must be one of {sorted(_ROLES)}, got {role!r}")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", \"text\": "
                                                                  "...}) are served")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise InvalidRequest(f"{where}.content", "must be a string or a list of text parts")
        messages.append(Message(role, content))
    return messages


class ChatTemplate:
    """A compiled template and the special tokens it is given."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._special = special_tokens

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """Raises InvalidRequest("messages", ...) when the template refuses the conversation (it raised, or
        failed on what it was given)."""
        try:
            return self._template.render(messages=[{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=add_generation_prompt, **self._special)
        except jinja2.TemplateError as e:
            raise InvalidRequest("messages", f"the model's chat template refused them: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise InvalidRequest("messages", f"the model's chat template failed on them: {e!r}") from None


def special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... as strings, as a template expects them."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out
