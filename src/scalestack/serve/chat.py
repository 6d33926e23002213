"""Conversations to prompt text through the model's chat template (Jinja, as Hugging Face renders it).

A continuation is rendered as a *tail*: the text that follows the previous turn's exact tokens. The previous
turn's last message is replaced by a sentinel and everything after the sentinel is the tail (that message's
closing, the new messages, the generation prompt), so earlier turns are never re-rendered and a template
that rewrites history cannot change tokens the model already holds in its KV cache.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

# ChatML with Hermes-style tool calls (Qwen2.5's convention): the template of models that ship none.
CHATML_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages and messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Function signatures are within <tools></tools>:
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools>

For each call, return a JSON object with the function name and arguments within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages and messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'system' and loop.first %}
{%- elif m.role == 'assistant' %}<|im_start|>assistant
{% if m.content %}{{ m.content }}{% endif %}
{%- for c in m.tool_calls or [] %}<tool_call>
{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

SENTINEL = "\u2063\u2063scalestack-sentinel\u2063\u2063"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class TemplateError(ValueError):
    """The chat template failed on this conversation (it raised, or it drops a message's content)."""


class ChatTemplate:
    """A Jinja chat template with Hugging Face's globals (``raise_exception``, ``tojson``, ``strftime_now``)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent)  # fmt: skip
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.calls_tools = TOOL_CALL_OPEN in source  # Hermes-style tool calls in the output are parsed

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, tools=tools or None, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            )  # fmt: skip
        except TemplateError:
            raise
        except Exception as e:  # a template raises whatever it likes on a conversation it does not take
            raise TemplateError(f"the chat template cannot render this conversation: {e}") from e

    def prompt(self, messages: list[dict], tools: list[dict] | None) -> str:
        """The first turn: the whole conversation and the generation prompt."""
        return self.render(messages, tools, add_generation_prompt=True)

    def tail(self, history: list[dict], new: list[dict], tools: list[dict] | None) -> str:
        """The text after ``history``'s last message content: its closing, the ``new`` messages and the
        generation prompt."""
        text = self.render(_mark_last(history) + new, tools, add_generation_prompt=True)
        return text[_sentinel_at(text) + len(SENTINEL) :]

    def prefill_text(self, history: list[dict], new: list[dict], tools: list[dict] | None) -> tuple[str, str]:
        """A prefill-only turn's text after ``history``'s last content (from the start without history) and
        its end that is the last new message's closing, which the next turn's tail starts with. When the
        template renders a message differently once it is followed by more, the closing is left out."""
        if not new:
            return "", ""
        base = _mark_last(history) if history else []
        full = self.render(base + new, tools, add_generation_prompt=False)
        start = _sentinel_at(full) + len(SENTINEL) if history else 0
        marked = self.render(base + _mark_last(new), tools, add_generation_prompt=False)
        open_part = marked[start : _sentinel_at(marked)]
        if full[start:].startswith(open_part):
            return full[start:], full[start + len(open_part) :]
        return open_part, ""


def _mark_last(messages: list[dict]) -> list[dict]:
    """The messages with the sentinel at the end of the last one's content (an assistant turn keeps only
    the sentinel: its exact tokens are already held, only its closing matters)."""
    if not messages:
        raise TemplateError("a continuation needs a previous turn with at least one message")
    last = messages[-1]
    if last["role"] == "assistant":
        marked = {"role": "assistant", "content": SENTINEL}
    else:
        marked = {**last, "content": (last.get("content") or "") + SENTINEL}
    return [*messages[:-1], marked]


def _sentinel_at(text: str) -> int:
    at = text.rfind(SENTINEL)
    if at < 0:
        raise TemplateError("the chat template drops the content of the last message; it cannot be continued")
    return at


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split generated text into its plain text and its Hermes-style tool calls (``<tool_call>{"name": ...,
    "arguments": {...}}</tool_call>``); a block that is not such JSON stays in the text."""
    plain, calls, rest = [], [], text
    while True:
        start = rest.find(TOOL_CALL_OPEN)
        if start < 0:
            plain.append(rest)
            break
        end = rest.find(TOOL_CALL_CLOSE, start)
        body = rest[start + len(TOOL_CALL_OPEN) : end if end >= 0 else len(rest)]
        call = _tool_call(body)
        if call is None:
            plain.append(rest[: end + len(TOOL_CALL_CLOSE)] if end >= 0 else rest)
        else:
            plain.append(rest[:start])
            calls.append(call)
        if end < 0:
            break
        rest = rest[end + len(TOOL_CALL_CLOSE) :]
    return "".join(plain), calls


def _tool_call(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    return {"name": data["name"], "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}
