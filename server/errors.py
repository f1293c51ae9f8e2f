"""HTTP-side errors and the ONE handler that turns any exception into ``{"error": {...}}``.

The runtime's typed errors (engines/errors.py) know nothing of HTTP; :data:`HTTP_STATUS` is the
one table that gives each error type its status, the server's own errors (queue full, deadline,
unknown image_id, auth) included. A type not in the table takes its nearest listed base class's
status. Framework errors (validation, 404, 405) go through the same handler, so every body a
client sees has the same shape.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engines.errors import (
    BackendUnavailable,
    BundleError,
    EngineError,
    ImageTooLarge,
    InvalidImage,
    InvalidInput,
    InvalidOption,
    InvalidPrompt,
    Sam3Error,
    UnsupportedImageType,
)

log = logging.getLogger("server")


class ServerError(Sam3Error):
    """Base of errors only the server knows about; ``headers`` go on the response."""

    headers: dict[str, str] = {}


class Unauthorized(ServerError):
    code = "unauthorized"
    headers = {"WWW-Authenticate": "X-API-Key"}


class ImageNotCached(InvalidInput):
    """An ``image_id`` whose embedding is not (or no longer) in the cache: resend the image."""

    code = "image_not_cached"


class PayloadTooLarge(InvalidInput):
    code = "payload_too_large"


class UnsupportedMediaType(InvalidInput):
    code = "unsupported_media_type"


class InvalidField(InvalidInput):
    """A body that parses but breaks the documented schema in a way the models cannot say
    (exactly one of image/image_id, an unknown form field): as a schema violation, 422."""

    code = "validation_error"


class BadRequest(InvalidInput):
    """A body that cannot be parsed at all (malformed multipart, bad base64, bad JSON)."""

    code = "bad_request"


class QueueFull(ServerError):
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(retry_after_s)))}


class DeadlineExceeded(ServerError):
    code = "deadline_exceeded"


class NotReady(ServerError):
    code = "not_ready"
    headers = {"Retry-After": "5"}


class RequestTimeout(InvalidInput):
    """The body did not arrive within SAM3_BODY_TIMEOUT_S: the connection is closed."""

    code = "request_timeout"
    headers = {"Connection": "close"}


class UntrustedHost(InvalidInput):
    """A Host header outside SAM3_TRUSTED_HOSTS."""

    code = "untrusted_host"


class SourceNotAllowed(InvalidInput):
    """A stream source the operator's settings do not allow (server/stream_sources.py)."""

    code = "source_not_allowed"


class InvalidSource(InvalidInput):
    """A stream source that is malformed or names nothing that exists."""

    code = "invalid_source"


class StreamNotFound(InvalidInput):
    code = "stream_not_found"


class TooManyStreams(ServerError):
    """SAM3_MAX_STREAMS live streams already (or streams are off)."""

    code = "too_many_streams"


# What the metrics record for a request whose client went away before it was answered (nginx's
# 499): never counted as a server error.
CLIENT_CLOSED = 499


# Every typed error's HTTP status, in one place.
HTTP_STATUS: dict[type[Sam3Error], int] = {
    Sam3Error: 500,
    BundleError: 500,
    EngineError: 500,
    BackendUnavailable: 503,
    InvalidInput: 422,
    InvalidImage: 422,
    InvalidPrompt: 422,
    InvalidOption: 422,
    ImageTooLarge: 413,
    UnsupportedImageType: 415,
    BadRequest: 400,
    InvalidField: 422,
    Unauthorized: 401,
    ImageNotCached: 404,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    QueueFull: 429,
    NotReady: 503,
    DeadlineExceeded: 504,
    RequestTimeout: 408,
    UntrustedHost: 400,
    SourceNotAllowed: 403,
    InvalidSource: 422,
    StreamNotFound: 404,
    TooManyStreams: 429,
}


def http_status(exc: Sam3Error) -> int:
    """The status of ``exc``: its type's entry in :data:`HTTP_STATUS`, else its nearest base's."""
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500  # pragma: no cover - Sam3Error itself is listed


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


_STARLETTE_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


async def error_response(request: Request, exc: Exception) -> JSONResponse:
    """The one exception handler. Registered for every exception type the app can see."""
    headers: dict[str, str] = {}
    extra: dict[str, Any] = {}
    if isinstance(exc, Sam3Error):
        status, code, message = http_status(exc), exc.code, str(exc) or exc.code
        headers = dict(getattr(exc, "headers", {}) or {})
        if status >= 500:
            log.error("%s on %s %s: %s", code, request.method, request.url.path, message)
    elif isinstance(exc, ValidationError) and any(e.get("type") == "json_invalid" for e in exc.errors()):
        # Not JSON at all (syntax, bad UTF-8): a malformed body, as a malformed multipart one.
        status, code = 400, "bad_request"
        message = "malformed JSON body: " + "; ".join(str(e.get("msg", "")) for e in exc.errors())
    elif isinstance(exc, (RequestValidationError, ValidationError)):
        status, code = 422, "validation_error"
        errors = exc.errors()
        extra["details"] = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in errors
        ]
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in extra["details"]) or "invalid request"
    elif isinstance(exc, StarletteHTTPException):
        status = exc.status_code
        code = _STARLETTE_CODES.get(status, f"http_{status}")
        message = str(exc.detail)
        headers = dict(exc.headers or {})
    else:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        status, code, message = 500, "internal_error", f"{type(exc).__name__}: internal error"
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


async def client_closed(request: Request, exc: Exception) -> Response:
    """The client went away mid-request (an aborted upload): one info line, status 499 in the
    metrics, nothing sent (there is nobody to send it to)."""
    log.info("client closed the connection during %s %s", request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED)


def install_error_handler(app: FastAPI) -> None:
    for exc_type in (Sam3Error, RequestValidationError, ValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(exc_type, error_response)
    # Handled by Starlette's ExceptionMiddleware (not its ServerErrorMiddleware, which would log
    # a traceback and re-raise for uvicorn to log another): a disconnect is not a server error.
    app.add_exception_handler(ClientDisconnect, client_closed)
