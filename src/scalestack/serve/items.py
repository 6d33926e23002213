"""Responses input items to chat messages (the shape chat templates take) and generated text to output items."""

from __future__ import annotations

import json
from typing import Any

from .errors import invalid

IGNORED_ITEMS = {"reasoning"}  # replayed by agent SDKs; nothing to render


def text_of(content: Any, param: str) -> str:
    """A message's content: a string, or a list of text parts (``input_text``, ``output_text``, ``text``)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{param} must be a string or a list of content parts", param)
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text", "refusal"):
            value = part.get("text", part.get("refusal"))
            if not isinstance(value, str):
                raise invalid(f"{param}[{i}] has no text", f"{param}[{i}]")
            texts.append(value)
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise invalid(f"{param}[{i}]: content of type {kind!r} is not supported (text only)", f"{param}[{i}]",
                          code="unsupported_content")  # fmt: skip
    return "".join(texts)


def to_messages(items: Any, call_names: dict[str, str]) -> list[dict]:
    """Chat messages of ``input`` (a string or a list of items). ``call_names`` maps call ids to function
    names over the whole conversation (a tool output names its function in most templates); it is updated."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise invalid("input must be a string or a list of items", "input")
    messages: list[dict] = []
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise invalid(f"{param} must be an object", param)
        kind = item.get("type", "message" if "role" in item else None)
        if not isinstance(kind, str):
            raise invalid(f"{param}.type must be a string (message, function_call, function_call_output)",
                          f"{param}.type")  # fmt: skip
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise invalid(f"{param}.role must be user, system, developer or assistant (got {role!r})",
                              f"{param}.role")  # fmt: skip
            content = text_of(item.get("content", ""), f"{param}.content")
            messages.append({"role": "system" if role == "developer" else role, "content": content})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise invalid(f"{param}.{key} must be a string", f"{param}.{key}")
            call_names[item["call_id"]] = item["name"]
            call = {"type": "function", "id": item["call_id"],
                    "function": {"name": item["name"], "arguments": _arguments(item["arguments"])}}  # fmt: skip
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                raise invalid(f"{param}.call_id must be a string", f"{param}.call_id")
            output = text_of(item.get("output", ""), f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": call_id, "name": call_names.get(call_id, ""),
                             "content": output})  # fmt: skip
        elif kind in IGNORED_ITEMS:
            continue
        else:
            raise invalid(f"{param}: item type {kind!r} is not supported (message, function_call, "
                          "function_call_output)", f"{param}.type", code="unsupported_item")  # fmt: skip
    return messages


def _arguments(text: str) -> Any:
    """Templates render arguments as an object; a string that is not JSON is passed as it is."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def to_tools(tools: Any) -> list[dict]:
    """Function tools in the chat-template shape (``{"type": "function", "function": {...}}``)."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise invalid(f"tools[{i}]: only function tools are supported (got type {kind!r})", f"tools[{i}].type",
                          code="unsupported_tool")  # fmt: skip
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise invalid(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        function = {"name": tool["name"], "parameters": tool.get("parameters") or {"type": "object", "properties": {}}}
        if tool.get("description"):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def assistant_message(text: str, calls: list[dict]) -> dict:
    """The assistant turn a response adds to the conversation (for rendering later turns' tails)."""
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [{"type": "function", "id": c["call_id"],
                                  "function": {"name": c["name"], "arguments": _arguments(c["arguments"])}}
                                 for c in calls]  # fmt: skip
    return message
