"""ASGI middleware, pure ASGI (no per-request task or body buffering): body bound and deadline,
request metrics, trusted hosts, CORS."""

from __future__ import annotations

import asyncio
import time
from contextlib import AbstractAsyncContextManager
from typing import Callable, Sequence

from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware as StarletteCORS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engines.errors import Sam3Error
from server.errors import CLIENT_CLOSED, PayloadTooLarge, RequestTimeout, UntrustedHost, error_body, http_status
from server.metrics import Metrics


class BodyLimitMiddleware:
    """413 before reading a body whose Content-Length is over the bound; count chunked ones.
    The whole body must arrive within ``body_timeout_s`` (else 408 and the connection closes)."""

    def __init__(self, app: ASGIApp, max_bytes_of: Callable[[], int], body_timeout_s: float = 30.0) -> None:
        self.app = app
        self.max_bytes_of = max_bytes_of
        self.body_timeout_s = body_timeout_s

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
        complete = False
        deadline = time.monotonic() + self.body_timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, complete
            if complete:  # after the body only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.body_timeout_s:g} s"
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"request body over {limit} bytes")
                complete = not message.get("more_body", False)
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
            reason = _REJECTED.get(status)
            if reason:
                self.metrics.rejected.labels(reason=reason).inc()


_REJECTED = {429: "queue_full", 504: "deadline", 408: "body_timeout", CLIENT_CLOSED: "client_closed"}


class AdmissionMiddleware:
    """The one admission point of POST /segment and /embed: a request takes a slot here, before
    routing, the body and the key are looked at, and holds it until answered; a full server
    refuses at once, the cheapest possible 429 (``admit``: server/service.py)."""

    PATHS = ("/segment", "/embed")

    def __init__(self, app: ASGIApp, admit: Callable[[], AbstractAsyncContextManager[None]]) -> None:
        self.app = app
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.PATHS):
            await self.app(scope, receive, send)
            return
        slot = self.admit()
        try:
            await slot.__aenter__()
        except Sam3Error as refused:
            scope["route"] = _Label(scope["path"])  # the metrics label, as routing would set it
            body = error_body(refused.code, str(refused))
            headers = dict(getattr(refused, "headers", {}) or {})
            await JSONResponse(body, status_code=http_status(refused), headers=headers)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await slot.__aexit__(None, None, None)


class _Label:
    def __init__(self, path: str) -> None:
        self.path = path


class TrustedHostMiddleware:
    """400 ``untrusted_host`` for a Host header outside ``hosts`` ('*.example.com' wildcards).

    Guards against DNS rebinding: a page on another site that resolves its own name to this
    server cannot use the API. The probes stay open (Docker's healthcheck asks 127.0.0.1).
    """

    OPEN_PATHS = ("/healthz", "/readyz")

    def __init__(self, app: ASGIApp, hosts: Sequence[str]) -> None:
        self.app = app
        self.hosts = [h.lower() for h in hosts]

    def allowed(self, host: str) -> bool:
        name = host.lower()
        if name.startswith("["):  # [::1]:8000
            name = name.split("]", 1)[0] + "]"
        else:
            name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        for pattern in self.hosts:
            if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
        if not self.allowed(host):
            exc = UntrustedHost(f"host {host!r} is not served here (SAM3_TRUSTED_HOSTS)")
            body = error_body(exc.code, str(exc))
            await JSONResponse(body, status_code=http_status(exc))(scope, receive, send)
            return
        await self.app(scope, receive, send)


class CORSMiddleware(StarletteCORS):
    """Starlette's CORS with the API's error shape for a refused preflight."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        message = bytes(response.body).decode("utf-8", "replace")
        return JSONResponse(error_body("cors_rejected", message), status_code=response.status_code, headers=headers)
