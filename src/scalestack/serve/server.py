"""Running the server: the service built around a model, and uvicorn with a shutdown that first lets the
responses in flight finish."""

from __future__ import annotations

import asyncio
import logging

import uvicorn

from .app import create_app
from .engine import Engine
from .kv_cache import KVPool
from .loading import ServedModel
from .responses import Limits, ResponsesService

log = logging.getLogger("scalestack.serve")


def build_service(model: ServedModel, kv_budget: int = 2 * 2**30, kv_ttl: float = 600.0, max_batch: int = 32,
                  prefill_chunk: int = 512, limits: Limits | None = None) -> ResponsesService:  # fmt: skip
    pool = KVPool(kv_budget, kv_ttl)
    return ResponsesService(model, Engine(model.runner, pool, max_batch, prefill_chunk), pool, limits)


def run_server(service: ResponsesService, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_connection_age: float = 3600.0, ws_ping_interval: float = 20.0,
               shutdown_timeout: float = 60.0, max_request_bytes: int = 16 * 2**20) -> None:  # fmt: skip
    app = create_app(service, api_key, max_request_bytes, max_connection_age, shutdown_timeout=shutdown_timeout)
    config = uvicorn.Config(app, host=host, port=port, ws="websockets-sansio", ws_max_size=max_request_bytes,
                            ws_ping_interval=ws_ping_interval, ws_ping_timeout=ws_ping_interval,
                            timeout_graceful_shutdown=shutdown_timeout, log_level="info")  # fmt: skip
    DrainingServer(config, service, shutdown_timeout).run()


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose shutdown first refuses new responses and waits for those in flight (uvicorn
    alone closes WebSockets mid-response)."""

    def __init__(self, config: uvicorn.Config, service: ResponsesService, timeout: float):
        super().__init__(config)
        self.service, self.timeout = service, timeout

    async def shutdown(self, sockets=None) -> None:
        self.service.draining = True
        if self.service.running:
            log.info("finishing %d response(s) in flight before shutting down", len(self.service.running))
            try:
                await asyncio.wait_for(self.service.wait_idle(), self.timeout)
            except TimeoutError:
                log.warning("responses still running after %s s; shutting down anyway", self.timeout)
        await super().shutdown(sockets)
