"""The Responses API's logic, transport-free: validate a create request, resolve ``previous_response_id``
to the exact token ids (and KV cache) of the chain, render only the new turn, run it on the engine, and turn
the engine's text into the Responses event sequence. HTTP (JSON or SSE) and WebSocket share it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .chat import TOOL_CALL_OPEN, TemplateError, parse_tool_calls
from .engine import Engine, Generation
from .errors import ServeError, invalid
from .items import assistant_message, to_messages, to_tools
from .kv_cache import KVCache, KVPool
from .loading import ServedModel
from .protocol import EventSequence, new_id, response_object, usage
from .sampling import SamplingParams
from .text_stream import MAX_STOP_CHARS, held_back

log = logging.getLogger("scalestack.serve")


@dataclass
class Limits:
    max_output_tokens: int = 4096  # the most a request may ask for
    default_output_tokens: int = 512  # when it asks for none
    max_stored_responses: int = 10_000  # store=true responses kept (least recently used dropped first)
    connection_responses: int = 64  # responses a WebSocket connection keeps for its own continuations


@dataclass
class Record:
    """A finished response and what a continuation needs: the conversation's messages (for rendering the
    next tail), its exact token ids, and its KV cache prefix."""

    response: dict
    messages: list[dict]
    call_names: dict[str, str]
    ids: torch.Tensor  # int32: the whole context and the output, end-of-turn token included
    setup: str  # instructions and tools the chain was rendered with
    consumed: str = ""  # the start of the turn's closing that the model generated (already in ids)
    cache: KVCache | None = None
    cache_length: int = 0


@dataclass
class Prepared:
    """A validated create request, rendered to token ids."""

    body: dict
    response_id: str
    ids: torch.Tensor
    params: SamplingParams
    messages: list[dict]
    call_names: dict[str, str]
    setup: str
    generate: bool
    tools_on: bool
    prefix: tuple[KVCache, int] | None
    parent: Record | None
    store: bool
    connection: OrderedDict[str, Record] | None
    background: bool = False
    closing: str = ""  # a prefill-only turn's text that closes its last message
    response: dict = field(default_factory=dict)


class ResponsesService:
    def __init__(self, model: ServedModel, engine: Engine, pool: KVPool, limits: Limits | None = None):
        self.model, self.engine, self.pool = model, engine, pool
        self.limits = limits or Limits()
        self.store: OrderedDict[str, Record] = OrderedDict()
        self.running: dict[str, tuple[Generation, dict, asyncio.Event]] = {}
        self._refs: dict[int, int] = {}  # cache id -> records holding it
        self.draining = False
        self.websockets_opened = 0

    # --- records and their caches ---

    def _hold(self, record: Record) -> None:
        if record.cache is not None:
            self._refs[id(record.cache)] = self._refs.get(id(record.cache), 0) + 1

    def _release(self, record: Record) -> None:
        cache = record.cache
        if cache is not None:
            left = self._refs.get(id(cache), 0) - 1
            if left > 0:
                self._refs[id(cache)] = left
            else:
                self._refs.pop(id(cache), None)
                self.pool.drop(cache)

    def _keep(self, table: OrderedDict[str, Record], key: str, record: Record, limit: int) -> None:
        self._hold(record)
        table[key] = record
        while len(table) > limit:
            self._release(table.popitem(last=False)[1])

    def close_connection(self, connection: OrderedDict[str, Record]) -> None:
        """A WebSocket closed: its connection-local responses go (their caches too, unless stored)."""
        while connection:
            self._release(connection.popitem()[1])

    def delete(self, response_id: str) -> None:
        record = self.store.pop(response_id, None)
        if record is None:
            raise _not_found(response_id)
        self._release(record)

    def get(self, response_id: str) -> dict:
        if response_id in self.running:
            return self.running[response_id][1]
        record = self.store.get(response_id)
        if record is None:
            raise _not_found(response_id)
        self.store.move_to_end(response_id)
        return record.response

    async def cancel(self, response_id: str) -> dict:
        """Stop a background response in progress (as OpenAI: only ``background`` responses are cancelled)."""
        running = self.running.get(response_id)
        if running is None or not running[1].get("background"):
            self.get(response_id)  # 404 when unknown
            raise invalid(f"response {response_id!r} is not a background response in progress; only those can be "
                          "cancelled", "response_id", code="response_not_cancellable")  # fmt: skip
        gen, response, finished = running
        gen.cancelled = True
        await finished.wait()
        return response

    async def wait_idle(self) -> None:
        while self.running:
            await asyncio.gather(*(finished.wait() for _, _, finished in list(self.running.values())))

    # --- create ---

    def prepare(self, body: Any, connection: OrderedDict[str, Record] | None = None,
                websocket: bool = False) -> Prepared:  # fmt: skip
        """Validate a create request and render its tokens; every problem is a ServeError (nothing has run)."""
        if self.draining:
            raise ServeError(503, "server_shutting_down", "the server is shutting down; retry on a new server",
                             type="server_error")  # fmt: skip
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model.name:
            raise ServeError(404, "model_not_found", f"model {model!r} is not served here; this server serves "
                             f"{self.model.name!r} (GET /v1/models)", "model")  # fmt: skip
        if "input" not in body and not body.get("previous_response_id"):
            raise invalid("input is required", "input", code="missing_required_parameter")
        if body.get("conversation") is not None:
            raise invalid("conversation is not supported; chain turns with previous_response_id", "conversation")
        if body.get("truncation") not in (None, "disabled"):
            raise invalid("only truncation='disabled' is supported", "truncation")
        background = bool(body.get("background"))
        if background and websocket:
            raise invalid("background is not supported over WebSocket", "background")
        store = body.get("store", True) is not False
        if background and not store:
            raise invalid("background responses must be stored (store=true)", "background")
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise invalid("instructions must be a string", "instructions")
        tools = to_tools(body.get("tools"))
        tool_choice = body.get("tool_choice", "auto")
        if tool_choice not in ("auto", "none", None):
            raise invalid("tool_choice must be 'auto' or 'none' here (this server does not force tool calls)",
                          "tool_choice", code="unsupported_value")  # fmt: skip
        generate = body.get("generate", True) is not False
        cache_options = body.get("prompt_cache_options") or {}
        if not isinstance(cache_options, dict):
            raise invalid("prompt_cache_options must be an object", "prompt_cache_options")
        if cache_options.get("prewarm"):
            generate = False
        params = self._sampling(body)
        setup = json.dumps([instructions, tools], sort_keys=True)
        template, tokenizer = self.model.template, self.model.tokenizer

        parent = self._parent(body.get("previous_response_id"), connection)
        call_names = dict(parent.call_names) if parent else {}
        new = to_messages(body.get("input", []), call_names)
        try:
            if parent is not None and parent.setup == setup:  # the chain's exact tokens, then the new turn's
                if generate:
                    text, closing = template.tail(parent.messages, new, tools), ""
                else:
                    text, closing = template.prefill_text(parent.messages, new, tools)
                held = len(os.path.commonprefix([parent.consumed, text]))  # the closing the parent already holds
                text = text[held:]
                ids = torch.cat([parent.ids, torch.tensor(tokenizer.encode(text), dtype=torch.int32)])
                messages = parent.messages + new
                prefix = (parent.cache, parent.cache_length) if parent.cache is not None else None
            else:  # a first turn, or new instructions or tools: rendered whole (no cached prefix applies)
                history = _without_instructions(parent) if parent is not None else []
                messages = ([{"role": "system", "content": instructions}] if instructions else []) + history + new
                if not messages:
                    raise invalid("the request has no input to respond to", "input")
                if generate:
                    text, closing = template.prompt(messages, tools), ""
                else:
                    text, closing = template.prefill_text([], messages, tools)
                ids, prefix = torch.tensor(tokenizer.encode(text), dtype=torch.int32), None
        except TemplateError as e:
            raise invalid(str(e), "input", code="invalid_prompt") from None
        room = self.model.runner.max_positions - ids.numel()
        if room < (1 if generate else 0):
            raise invalid(f"the conversation has {ids.numel()} tokens and the model's context holds "
                          f"{self.model.runner.max_positions}; start a new chain with less input",
                          "input", code="context_length_exceeded")  # fmt: skip
        positions = self.engine.tokens_needed(ids.numel(), params.max_tokens if generate else 0)
        need = self.engine.bytes_per_token * positions
        if need > self.pool.budget:
            raise invalid(f"this response needs {need} bytes of KV cache and the server's budget is "
                          f"{self.pool.budget} bytes; ask for fewer max_output_tokens or start a new chain",
                          "max_output_tokens", code="kv_budget_exceeded")  # fmt: skip
        echo = {"instructions": instructions, "tools": body.get("tools") or [], "tool_choice": tool_choice or "auto",
                "max_output_tokens": params.max_tokens, "store": store}  # fmt: skip
        body = {**body, **echo}
        return Prepared(body, new_id("resp"), ids, params, messages, call_names, setup, generate,
                        bool(tools) and tool_choice != "none" and template.calls_tools, prefix, parent, store,
                        connection, background, closing)  # fmt: skip

    def _sampling(self, body: dict) -> SamplingParams:
        limit = self.limits.max_output_tokens
        max_tokens = body.get("max_output_tokens")
        max_tokens = self.limits.default_output_tokens if max_tokens is None else max_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limit:
            raise invalid(f"max_output_tokens must be an integer from 1 to {limit}", "max_output_tokens")
        temperature = body.get("temperature", 1.0)
        temperature = 1.0 if temperature is None else temperature
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise invalid("temperature must be a number from 0 to 2", "temperature")
        top_p = body.get("top_p", 1.0)
        top_p = 1.0 if top_p is None else top_p
        if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise invalid("top_p must be a number in (0, 1]", "top_p")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64):
            raise invalid("seed must be an integer from 0 to 2**64 - 1", "seed")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
            raise invalid("stop must be a string or a list of at most 4 non-empty strings", "stop")
        if any(len(s) > MAX_STOP_CHARS for s in stop):
            raise invalid(f"a stop string may have at most {MAX_STOP_CHARS} characters", "stop")
        return SamplingParams(float(temperature), float(top_p), seed, max_tokens, stop + self.model.stop,
                              set(self.model.stop_token_ids))  # fmt: skip

    def _parent(self, response_id: Any, connection: OrderedDict[str, Record] | None) -> Record | None:
        if response_id is None:
            return None
        if not isinstance(response_id, str):
            raise invalid("previous_response_id must be a string", "previous_response_id")
        for table in (connection, self.store):
            if table is not None and response_id in table:
                table.move_to_end(response_id)
                return table[response_id]
        where = " on this connection or" if connection is not None else ""
        raise ServeError(400, "previous_response_not_found", f"previous response {response_id!r} was not found"
                         f"{where} in the store (stored with store=false, deleted, or expired); send the full "
                         "context without previous_response_id", "previous_response_id")  # fmt: skip

    async def run(self, req: Prepared) -> AsyncIterator[dict]:
        """The response's events; the finished response is stored (store=true) and kept on its connection."""
        response = response_object(req.response_id, self.model.name, req.body)
        req.response = response
        seq = EventSequence(response)
        loop = asyncio.get_running_loop()
        gen = Generation(req.ids.long(), req.params, req.prefix, req.generate, loop, asyncio.Queue(),
                         self.model.tokenizer.decode)  # fmt: skip
        finished = asyncio.Event()
        self.running[req.response_id] = (gen, response, finished)
        splitter = _ToolCallSplitter(req.tools_on)
        reason, done = "error: not started", False
        try:
            yield seq.lifecycle("response.created")
            yield seq.lifecycle("response.in_progress")
            self.engine.submit(gen)
            while True:
                kind, value = await gen.events.get()
                if kind == "text":
                    for event in seq.text(visible) if (visible := splitter.push(value)) else []:
                        yield event
                elif kind == "done":
                    reason, done = value, True
                    break
            rest, calls = splitter.finish()
            for event in seq.text(rest) if rest else []:
                yield event
            status = {"stop": "completed", "length": "incomplete", "cancelled": "cancelled"}.get(reason, "failed")
            for event in seq.close_text("completed" if status == "completed" else "incomplete"):
                yield event
            for call in calls:
                for event in seq.function_call(call["name"], call["arguments"]):
                    yield event
            out_ids = gen.output_ids + ([gen.stop_token] if gen.stop_token is not None else [])
            response.update(status=status, usage=usage(req.ids.numel(), gen.cached_tokens, len(out_ids)))
            if status == "incomplete":
                response["incomplete_details"] = {"reason": "max_output_tokens"}
            if status == "failed":
                response["error"] = {"code": "server_error", "message": f"generation failed ({reason[7:]})"}
                log.error("response %s failed: %s", req.response_id, reason)
            self._remember(req, gen, out_ids, reason, keep_cache=status != "failed")
            yield seq.lifecycle(f"response.{status}" if status != "cancelled" else "response.incomplete")
        finally:
            if not done:
                gen.cancelled = True  # the client went away: free its batch slot
            self.running.pop(req.response_id, None)
            finished.set()

    def _remember(self, req: Prepared, gen: Generation, out_ids: list[int], reason: str, keep_cache: bool) -> None:
        """Store the finished response (a cancelled one too: it continues from what it wrote); a failed one's
        cache is dropped, its continuation prefills again."""
        text = "".join(part["text"] for item in req.response["output"] if item["type"] == "message"
                       for part in item["content"])  # fmt: skip
        calls = [item for item in req.response["output"] if item["type"] == "function_call"]
        for call in calls:
            req.call_names[call["call_id"]] = call["name"]
        messages = req.messages + ([assistant_message(text, calls)] if req.generate else [])
        consumed = req.closing
        if reason == "stop" and req.generate:  # the closing text the model wrote: decoded tokens past the text
            consumed = self.model.tokenizer.decode(out_ids)[len(gen.stream.text) :]
        ids = torch.cat([req.ids, torch.tensor(out_ids, dtype=torch.int32)])
        cache = gen.cache if keep_cache else None
        if not keep_cache and gen.cache is not None and not self._refs.get(id(gen.cache)):
            self.pool.drop(gen.cache)
        record = Record(req.response, messages, req.call_names, ids, req.setup, consumed, cache, gen.cache_length)
        if req.store:
            self._keep(self.store, req.response_id, record, self.limits.max_stored_responses)
        if req.connection is not None:
            self._keep(req.connection, req.response_id, record, self.limits.connection_responses)
        unreferenced = record.cache is not None and not self._refs.get(id(record.cache))
        if not req.store and req.connection is None and unreferenced:
            self.pool.drop(record.cache)  # nobody can continue it

    async def respond(self, req: Prepared) -> dict:
        """Run to the end; the final response object."""
        async for _ in self.run(req):
            pass
        return req.response


class _ToolCallSplitter:
    """Streams text up to the first ``<tool_call>`` (holding back what may be its start, and leading
    whitespace); everything from there is parsed into function calls at the end."""

    def __init__(self, active: bool):
        self.active = active
        self.text = ""
        self.sent = 0
        self.in_call = False

    def push(self, delta: str) -> str:
        self.text += delta
        if not self.active:
            return self._take(len(self.text))
        if self.in_call:
            return ""
        at = self.text.find(TOOL_CALL_OPEN, self.sent)
        if at >= 0:
            self.in_call = True
            return self._take(at)
        return self._take(len(self.text) - held_back(self.text, [TOOL_CALL_OPEN]))

    def finish(self) -> tuple[str, list[dict]]:
        rest = self.text[self.sent :]
        if not self.active:
            return rest, []
        plain, calls = parse_tool_calls(rest)
        if calls and not plain.strip():
            plain = ""
        return (plain if self.sent or plain.strip() else ""), calls

    def _take(self, upto: int) -> str:
        if self.active and self.sent == 0 and not self.text[:upto].strip():
            return ""  # no message for whitespace before a tool call
        delta, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return delta


def _not_found(response_id: str) -> ServeError:
    return ServeError(404, "not_found", f"no stored response with id {response_id!r}", "response_id")


def _without_instructions(record: Record) -> list[dict]:
    """A chain's messages without the system message its first turn's instructions added."""
    instructions = json.loads(record.setup)[0]
    messages = record.messages
    if instructions and messages and messages[0] == {"role": "system", "content": instructions}:
        return messages[1:]
    return list(messages)
