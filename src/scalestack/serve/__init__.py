"""A local Responses-API server for agents: HTTP and WebSocket, KV caches reused across turns, continuous
batching. Needs the ``serve`` extra (starlette, uvicorn, websockets)."""

from .app import create_app
from .engine import Engine, Generation
from .kv_cache import KVCache, KVPool
from .loading import ServedModel, load_model
from .responses import Limits, ResponsesService
from .server import build_service, run_server

__all__ = [
    "Engine",
    "Generation",
    "KVCache",
    "KVPool",
    "Limits",
    "ResponsesService",
    "ServedModel",
    "build_service",
    "create_app",
    "load_model",
    "run_server",
]
