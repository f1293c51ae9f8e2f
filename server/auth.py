"""API keys and namespaces.

With no key configured every client shares one namespace (``""``) and the API is open. With keys
(``SAM3_API_KEY``, ``SAM3_API_KEYS=name:key,...``) each key's *name* is its namespace: image ids are
keyed by it (server/image_ids.py) and so is the embedding cache, so one key cannot compute, read,
probe (``cache_hit``, ``/embed``'s ``cached``, timing) or delete another key's embeddings.
``/metrics`` needs a key too when ``SAM3_METRICS_NEED_KEY`` is set. The probes and the demo page
never do (Docker's healthcheck has no key).
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import Unauthorized
from server.settings import Settings

HEADER = "x-api-key"
OPEN_NAMESPACE = ""


class ApiKeys:
    """Which namespace a presented key opens (constant-time: every key is compared)."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [(k.name, k.key.get_secret_value().encode()) for k in settings.keys()]
        self.metrics_need_key = settings.metrics_need_key

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def namespace(self, given: str | None) -> str:
        """The namespace of ``given``; raises Unauthorized when keys are on and it opens none."""
        if not self._keys:
            return OPEN_NAMESPACE
        presented = (given or "").encode("utf-8", "surrogateescape")
        found = None
        for name, key in self._keys:  # no early exit: the time does not depend on which key
            if hmac.compare_digest(presented, key):
                found = name
        if found is None:
            raise Unauthorized("missing or wrong X-API-Key")
        return found


def require_api_key(request: Request) -> str:
    """Dependency of the API routes: the caller's namespace (also left on ``request.state``)."""
    keys: ApiKeys = request.app.state.api_keys
    namespace = keys.namespace(request.headers.get(HEADER))
    request.state.namespace = namespace
    return namespace


def require_metrics_key(request: Request) -> None:
    keys: ApiKeys = request.app.state.api_keys
    if keys.metrics_need_key:
        keys.namespace(request.headers.get(HEADER))
