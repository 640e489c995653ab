"""Chat prompts: a bundle's Jinja chat template rendered as transformers renders it (jinja2, no transformers)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from kninfer.errors import KninferError
from kninfer.runtime.bundle import Bundle
from kninfer.runtime.tokenizer import decode, encode

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": text}


@dataclass(frozen=True)
class ChatTemplate:
    """A bundle's chat template, compiled, with the tokenizer and special-token strings it is rendered with."""

    template: jinja2.Template
    tokenizer: Tokenizer = field(repr=False)
    special_tokens: dict[str, str]  # bos_token, eos_token: as transformers passes its special_tokens_map
    source: str  # the bundle, for messages

    def render(self, messages: list[Message]) -> str:
        """The conversation as the model reads it, ending with the assistant's generation prompt."""
        _check_messages(messages)
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special_tokens)
        except Exception as error:  # the template is the bundle's code: whatever it raises is bad input
            raise KninferError(f"the chat template of '{self.source}' failed: {_first_line(error)}") from None

    def ids(self, messages: list[Message]) -> list[int]:
        """Token ids of the rendered conversation; the template writes its special tokens itself."""
        return encode(self.tokenizer, self.render(messages), special_tokens=False)

    def fit(self, messages: list[Message], context: int, budget: int) -> list[Message]:
        """`messages` less their oldest turns (a user message and the replies after it; a leading system message
        stays) while the prompt has more than `budget` tokens; an error when the prompt left still fills the
        context."""
        kept, ids = messages, self.ids(messages)
        while len(ids) > budget and (shorter := _without_oldest_turn(kept)) is not None:
            kept, ids = shorter, self.ids(shorter)
        if len(ids) >= context:
            raise KninferError(f"the last message does not fit: its prompt has {len(ids)} tokens, the model's "
                               f"context is {context}: shorten it")
        return kept


def chat_template(bundle: Bundle, tokenizer: Tokenizer) -> ChatTemplate:
    """The bundle's chat template compiled as transformers compiles it; an error when the bundle has none."""
    source = bundle.meta.get("chat_template")
    if source is None:
        raise KninferError(f"'{bundle.onnx_path}' has no chat template: use `kninfer generate`")
    ids = {"bos_token": bundle.meta.get("bos_token_id"), "eos_token": bundle.eos_token_id}
    special_tokens = {name: decode(tokenizer, [i]) for name, i in ids.items() if i is not None}
    try:
        template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise KninferError(f"the chat template of '{bundle.onnx_path}' is not valid Jinja: {error}") from None
    return ChatTemplate(template, tokenizer, special_tokens, str(bundle.onnx_path))


def _environment() -> ImmutableSandboxedEnvironment:
    """transformers' environment (utils/chat_template_utils.py), less its {% generation %} tag for training masks."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda pattern: datetime.now().strftime(pattern)
    return environment


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """JSON without jinja's HTML escaping, as transformers' filter."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _check_messages(messages: list[Message]) -> None:
    """At least one message, each with a role and a content string."""
    if not messages:
        raise KninferError("no message given: expected a list of {'role': ..., 'content': ...}")
    for number, message in enumerate(messages, 1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise KninferError(f"message {number} is {message!r:.60}: expected {{'role': str, 'content': str}}")


def _without_oldest_turn(messages: list[Message]) -> list[Message] | None:
    """`messages` without their first turn after a leading system message; None when no later user message is left
    to start the conversation."""
    start = int(messages[0]["role"] == "system")
    later_users = [i for i in range(start + 1, len(messages)) if messages[i]["role"] == "user"]
    return messages[:start] + messages[later_users[0]:] if later_users else None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
