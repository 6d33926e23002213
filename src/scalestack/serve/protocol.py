"""The Responses API's objects and the event sequence of one response, as the ``openai`` SDK reads them
(the same events stream over SSE and over WebSocket)."""

from __future__ import annotations

import secrets
import time
from typing import Any


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "previous_response_id", "store",
          "temperature", "tool_choice", "tools", "top_p", "truncation", "background", "text", "user")  # fmt: skip


def response_object(response_id: str, model: str, body: dict) -> dict[str, Any]:
    response = {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "model": model,
        "status": "in_progress",
        "output": [],
        "usage": None,
        "error": None,
        "incomplete_details": None,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "temperature": 1.0,
        "top_p": 1.0,
        "store": True,
        "truncation": "disabled",
        "metadata": {},
    }
    response.update({key: body[key] for key in ECHOED if body.get(key) is not None})
    return response


def usage(input_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


class EventSequence:
    """Builds one response's events in order, numbering them, and its output items as they finish."""

    def __init__(self, response: dict[str, Any]):
        self.response = response
        self.number = 0
        self.message: dict | None = None  # the open text message, if any

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.number, **fields}
        self.number += 1
        return event

    def lifecycle(self, kind: str) -> dict[str, Any]:
        return self.event(kind, response=dict(self.response))

    def text(self, delta: str) -> list[dict[str, Any]]:
        events = []
        if self.message is None:
            self.message = {"type": "message", "id": new_id("msg"), "status": "in_progress", "role": "assistant",
                            "content": []}  # fmt: skip
            self.response["output"].append(self.message)
            index = len(self.response["output"]) - 1
            events.append(self.event("response.output_item.added", output_index=index, item=dict(self.message)))
            events.append(self.event("response.content_part.added", item_id=self.message["id"], output_index=index,
                                     content_index=0, part=_text_part("")))  # fmt: skip
            self.message["content"].append(_text_part(""))
        self.message["content"][0]["text"] += delta
        index = self._index(self.message)
        events.append(self.event("response.output_text.delta", item_id=self.message["id"], output_index=index,
                                 content_index=0, delta=delta, logprobs=[]))  # fmt: skip
        return events

    def close_text(self, status: str) -> list[dict[str, Any]]:
        if self.message is None:
            return []
        message, index = self.message, self._index(self.message)
        part = message["content"][0]
        message["status"] = status
        self.message = None
        return [
            self.event("response.output_text.done", item_id=message["id"], output_index=index, content_index=0,
                       text=part["text"], logprobs=[]),
            self.event("response.content_part.done", item_id=message["id"], output_index=index, content_index=0,
                       part=dict(part)),
            self.event("response.output_item.done", output_index=index, item=_copy(message)),
        ]  # fmt: skip

    def function_call(self, name: str, arguments: str) -> list[dict[str, Any]]:
        item = {"type": "function_call", "id": new_id("fc"), "call_id": new_id("call"), "name": name,
                "arguments": "", "status": "in_progress"}  # fmt: skip
        self.response["output"].append(item)
        index = len(self.response["output"]) - 1
        events = [self.event("response.output_item.added", output_index=index, item=dict(item))]
        item["arguments"] = arguments
        events.append(self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                                 delta=arguments))  # fmt: skip
        events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                 name=name, arguments=arguments))  # fmt: skip
        item["status"] = "completed"
        events.append(self.event("response.output_item.done", output_index=index, item=dict(item)))
        return events

    def _index(self, item: dict) -> int:
        return next(i for i, x in enumerate(self.response["output"]) if x is item)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _copy(message: dict) -> dict:
    return {**message, "content": [dict(part) for part in message["content"]]}
