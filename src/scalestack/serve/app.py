"""The ASGI app: the Responses API over HTTP (JSON and SSE) and WebSocket, ``/v1/models``, API-key checks
and request-size bounds, on Starlette (served by uvicorn)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from .errors import ServeError, invalid
from .responses import ResponsesService

log = logging.getLogger("scalestack.serve")


def create_app(service: ResponsesService, api_key: str | None = None, max_request_bytes: int = 16 * 2**20,
               max_connection_age: float = 3600.0, max_connections: int = 256,
               shutdown_timeout: float = 60.0) -> Starlette:  # fmt: skip
    """The server's app around ``service``: starts and stops its engine with the app's lifespan."""
    background: set[asyncio.Task] = set()
    open_sockets = 0

    async def create(request: Request) -> Response:
        body = await _json_body(request, max_request_bytes)
        req = service.prepare(body)
        if req.background:
            events = service.run(req)
            first = await anext(events)  # response.created: the response is now visible to GET and cancel
            task = asyncio.create_task(_drain(events))
            background.add(task)
            task.add_done_callback(background.discard)
            return JSONResponse(first["response"])
        if body.get("stream"):
            return StreamingResponse(_sse(service.run(req)), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        return JSONResponse(await service.respond(req))

    async def retrieve(request: Request) -> Response:
        return JSONResponse(service.get(request.path_params["response_id"]))

    async def delete(request: Request) -> Response:
        response_id = request.path_params["response_id"]
        service.delete(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    async def cancel(request: Request) -> Response:
        return JSONResponse(await service.cancel(request.path_params["response_id"]))

    async def models(request: Request) -> Response:
        model = {"id": service.model.name, "object": "model", "created": int(started), "owned_by": "scalestack"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "draining" if service.draining else "ok", "running": len(service.running)})

    async def websocket(ws: WebSocket) -> None:
        nonlocal open_sockets
        if open_sockets >= max_connections:
            await ws.close(1013, f"over {max_connections} WebSocket connections; retry later")
            return
        open_sockets += 1
        try:
            await _websocket_session(ws, service, max_connection_age)
        finally:
            open_sockets -= 1

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        service.engine.start()
        try:
            yield
        finally:
            service.draining = True
            try:
                await asyncio.wait_for(service.wait_idle(), shutdown_timeout)
            except TimeoutError:
                log.warning("responses still running after %s s; stopping them", shutdown_timeout)
                for gen, _, _ in list(service.running.values()):
                    gen.cancelled = True
            for task in list(background):
                task.cancel()
            service.engine.stop()

    started = time.time()
    app = Starlette(
        routes=[
            Route("/v1/responses", create, methods=["POST"]),
            WebSocketRoute("/v1/responses", websocket),
            Route("/v1/responses/{response_id}", retrieve, methods=["GET"]),
            Route("/v1/responses/{response_id}", delete, methods=["DELETE"]),
            Route("/v1/responses/{response_id}/cancel", cancel, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={ServeError: _error_response, Exception: _internal_error},
        lifespan=lifespan,
    )
    return _require_key(app, api_key) if api_key else app


async def _json_body(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, "request_too_large", f"the request body is over {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, "request_too_large", f"the request body is over {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, nesting too deep
        raise invalid(f"the request body is not valid JSON: {e}", code="invalid_json") from None


async def _sse(events):
    async for event in events:
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
    yield "data: [DONE]\n\n"


async def _drain(events) -> None:
    async for _ in events:
        pass


async def _error_response(request: Request, error: ServeError) -> Response:
    return JSONResponse({"error": error.body()}, status_code=error.status)


def _server_error(error: Exception) -> ServeError:
    if isinstance(error, RecursionError):
        return invalid("the request is nested too deeply", code="invalid_request")
    return ServeError(500, "server_error", f"{type(error).__name__}: {error}", type="server_error")


async def _internal_error(request: Request, error: Exception) -> Response:
    log.exception("request failed")
    error = _server_error(error)
    return JSONResponse({"error": error.body()}, status_code=error.status)


def _error_event(error: ServeError) -> dict:
    return {"type": "error", "status": error.status, "error": error.body()}


async def _websocket_session(ws: WebSocket, service: ResponsesService, max_age: float) -> None:
    """One WebSocket connection: ``response.create`` events run one at a time; an error is an ``error``
    event and the connection stays usable; the connection's own responses chain without being stored."""
    await ws.accept()
    service.websockets_opened += 1
    opened = time.monotonic()
    connection: OrderedDict = OrderedDict()
    running: asyncio.Task | None = None

    async def stream(req, stream_id) -> None:
        try:
            async for event in service.run(req):
                if stream_id is not None:
                    event["stream_id"] = stream_id
                await ws.send_text(json.dumps(event))
        except WebSocketDisconnect:
            pass  # the client went away mid-response: run() frees the engine slot
        except Exception as e:  # a bug: the client gets an error event, not silence
            log.exception("WebSocket response failed")
            with contextlib.suppress(Exception):
                await ws.send_text(json.dumps(_error_event(_server_error(e))))

    try:
        while True:
            left = max_age - (time.monotonic() - opened)
            try:
                message = await asyncio.wait_for(ws.receive(), timeout=max(left, 0.001))
            except TimeoutError:
                if running is not None:
                    await running  # the response in flight finishes first
                await ws.send_text(json.dumps(_error_event(ServeError(
                    400, "websocket_connection_limit_reached",
                    f"this connection reached its maximum age of {max_age:g} s; open a new one"))))  # fmt: skip
                await ws.close(1000)
                return
            if message["type"] == "websocket.disconnect":
                return
            try:
                event = _parse_event(message)
                if running is not None and not running.done():
                    raise ServeError(409, "response_already_in_flight", "a response is in progress on this "
                                     "connection; wait for its terminal event or open another connection")  # fmt: skip
                fields = {k: v for k, v in event.items() if k not in ("type", "stream_id")}
                req = service.prepare(fields, connection, websocket=True)
            except ServeError as e:
                await ws.send_text(json.dumps(_error_event(e)))
                continue
            except Exception as e:  # input the checks missed: an error event, the connection stays
                log.exception("WebSocket request failed")
                await ws.send_text(json.dumps(_error_event(_server_error(e))))
                continue
            running = asyncio.create_task(stream(req, event.get("stream_id")))
    except WebSocketDisconnect:
        pass
    finally:
        if running is not None and not running.done():
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        service.close_connection(connection)


def _parse_event(message: dict) -> dict:
    raw = message.get("text")
    if raw is None and message.get("bytes") is not None:
        raw = message["bytes"].decode("utf-8", errors="replace")
    try:
        event = json.loads(raw or "")
    except (ValueError, RecursionError) as e:
        raise invalid(f"the message is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(event, dict):
        raise invalid("the message must be a JSON object with a type", "type", code="invalid_event")
    if event.get("type") != "response.create":
        raise invalid(f"unknown event type {event.get('type')!r}; this server takes response.create", "type",
                      code="unknown_event_type")  # fmt: skip
    return event


def _require_key(app, api_key: str):
    """Refuse every HTTP request and WebSocket handshake without ``Authorization: Bearer <api_key>``."""
    expected = f"Bearer {api_key}".encode()

    async def guarded(scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, expected):
                if scope["type"] == "websocket":
                    await receive()  # websocket.connect: the handshake is then refused (HTTP 403)
                    await send({"type": "websocket.close", "code": 1008, "reason": "invalid API key"})
                    return
                error = {"type": "invalid_request_error", "code": "invalid_api_key", "param": None,
                         "message": "missing or wrong API key: send Authorization: Bearer <key>"}  # fmt: skip
                await JSONResponse({"error": error}, status_code=401)(scope, receive, send)
                return
        await app(scope, receive, send)

    return guarded
