"""ASGI middleware, pure ASGI (no per-request task or body buffering): body bound, request metrics."""

from __future__ import annotations

import time
from typing import Callable

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import PayloadTooLarge, error_body
from server.metrics import Metrics


class BodyLimitMiddleware:
    """413 before reading a body whose Content-Length is over the bound; count chunked ones."""

    def __init__(self, app: ASGIApp, max_bytes_of: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes_of = max_bytes_of

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes_of()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                too_big = False
            if too_big:
                body = error_body("payload_too_large", f"request body over {limit} bytes")
                await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body over {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class MetricsMiddleware:
    """Per-route latency histogram, labelled by the route template (bounded cardinality)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.observe_request(path, scope["method"], status, time.perf_counter() - start)
            if status == 429:
                self.metrics.rejected.labels(reason="queue_full").inc()
            elif status == 504:
                self.metrics.rejected.labels(reason="deadline").inc()
