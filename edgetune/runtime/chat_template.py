"""Chat templates rendered exactly as transformers' ``apply_chat_template`` renders them.

A bundle carries its model's Jinja chat template; the prompt the runtime builds from it must
be the one the model saw in training, byte for byte. So the environment here is a copy of the
one transformers compiles templates in (``transformers/utils/chat_template_utils.py``,
``_compile_jinja_template`` and ``render_jinja_template``), with only jinja2 as a dependency:

- ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)``, with the
  ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``) and a ``{% generation %}``
  tag (marks assistant text for training masks; renders its body unchanged);
- ``tojson`` replaced: ``json.dumps`` with ``ensure_ascii=False`` (non-ASCII text stays as
  is), the ``indent``/``separators``/``sort_keys`` options, and a plain ``str`` (jinja's own
  returns HTML-safe ``Markup``);
- globals ``raise_exception(message)`` and ``strftime_now(format)`` (local time);
- the variables ``messages``, ``tools``, ``documents`` (``None`` when not given, so a
  template's ``tools is defined`` is true as in transformers), ``add_generation_prompt``, and
  the tokenizer's special tokens (``bos_token``, ``eos_token``, ...).

Usage::

    from edgetune.runtime.chat_template import render
    msgs = [{"role": "user", "content": "hi"}]
    text = render(template, msgs, special_tokens={"eos_token": "</s>"})
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import EdgetuneError


class PromptError(EdgetuneError):
    """The prompt cannot be run (empty, not text, longer than the context, or refused by the
    chat template)."""


class _TemplateRaised(jinja2.TemplateError):
    """A template's own ``raise_exception(message)``."""


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to find the assistant's
    tokens for a training mask; rendering a prompt only needs the body, unchanged."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """The template compiled once per distinct text; raises PromptError on a syntax error."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise PromptError(f"chat template: line {e.lineno}: {e.message}") from None


def render(
    template: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    special_tokens: dict[str, Any] | None = None,
    **extra: Any,
) -> str:
    """``messages`` as the prompt text ``tokenizer.apply_chat_template(messages,
    tokenize=False, tools=tools, add_generation_prompt=...)`` gives for a tokenizer whose
    ``special_tokens_map`` is ``special_tokens``; ``extra`` are further template variables
    (``date_string``, ``enable_thinking``, ...). Tools are JSON schemas (dicts). A template's
    ``raise_exception`` and any template error raise PromptError. ``continue_final_message``
    leaves the last message open (the prompt ends with its text, not its end-of-turn), so
    the model continues it: a reply begun for it ("Sure, the JSON is: {")."""
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise PromptError("tools must be a list of JSON-schema dicts")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise PromptError("documents must be a list of dicts")
    if continue_final_message:
        if add_generation_prompt:
            raise PromptError(
                "continue_final_message and add_generation_prompt exclude each other: one "
                "continues the last message, the other opens a new assistant turn"
            )
        messages, final = _tag_final(messages)
        text = _render(template, messages, tools, documents, False, special_tokens, extra)
        return _cut_at_tag(text, final)
    return _render(
        template, messages, tools, documents, add_generation_prompt, special_tokens, extra
    )


#: what transformers appends to the final message to find where it ends in the rendered text
_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final(messages: list[dict]) -> tuple[list[dict], str]:
    """(messages with the tag after the final message's text, that text)."""
    if not messages:
        raise PromptError("continue_final_message needs a message to continue")
    messages = copy.deepcopy(messages)
    last = messages[-1]
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + _TAG
        return messages, content
    for part in reversed(content or []):
        if isinstance(part, dict) and part.get("type") == "text":
            final = part["text"]
            part["text"] = final + _TAG
            return messages, final
    raise PromptError("continue_final_message: the final message has no text to continue")


def _cut_at_tag(text: str, final: str) -> str:
    """The rendered chat up to where the final message's text ends (as transformers cuts)."""
    tag = _TAG.strip()
    if final.strip() not in text or tag not in text:
        raise PromptError(
            "continue_final_message: the chat template drops part of the final message"
        )
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(_TAG)] == _TAG else text[:at].rstrip()


def _render(
    template: str,
    messages: list[dict],
    tools: list[dict] | None,
    documents: list[dict] | None,
    add_generation_prompt: bool,
    special_tokens: dict[str, Any] | None,
    extra: dict[str, Any],
) -> str:
    context = {**(special_tokens or {}), **extra}
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except _TemplateRaised as e:
        raise PromptError(f"chat template: {e.message}") from None
    except (jinja2.TemplateError, TypeError) as e:  # e.g. a message field the template lacks
        raise PromptError(f"chat template failed: {e}") from None
