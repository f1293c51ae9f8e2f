"""Typed client errors: one class per thing a caller can act on differently.

``ServerUnreachable`` (nothing listens: start the server), ``RequestTimeout`` (it listens but
did not answer in time), ``ApiError`` (it answered with a JSON error body; ``code`` is the
server's stable machine-readable name) and ``RateLimited`` (429 after the bounded retries).
The CLI prints ``str(exc)`` as its one-line message, so every message names the URL or code.
"""

from __future__ import annotations


class ClientError(Exception):
    """Base of everything :class:`clients.Sam3Client` raises on purpose."""


class ServerUnreachable(ClientError):
    """Connection refused / DNS / network down: no HTTP exchange happened."""


class RequestTimeout(ClientError):
    """The server accepted the connection but did not answer within the timeout."""


class InvalidResponse(ClientError):
    """A 2xx answer that is not the documented JSON document (wrong URL, proxy page, ...)."""


class ApiError(ClientError):
    """A 4xx/5xx answer. ``code``/``message`` come from ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


class RateLimited(ApiError):
    """429 (queue full) still returned after the client's bounded retries."""
