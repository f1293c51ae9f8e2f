"""``--backend triton``: what the server adds for a pipeline whose parts run on Triton.

The engines are remote (engines/triton.py): the server keeps its API, caches and limits and
passes the Triton settings to the backend. Two server-side facts follow from "remote":
- the pipeline can be loaded (Triton reached once) and later lose its engines: /readyz asks the
  backend again on every probe, so a load balancer stops sending traffic to a server whose
  Triton is gone, and takes it back when Triton returns (gRPC reconnects by itself);
- a call to a dead Triton fails within SAM3_TRITON_TIMEOUT_S as 503 ``backend_unavailable``
  (engines.errors.BackendUnavailable), through the one error handler.
"""

from __future__ import annotations

from typing import Any

from anyio import to_thread

from server.settings import Settings

# A probe that cannot reach Triton within this answers "not ready" (well inside a kubelet's
# default 1 s... 5 s probe timeout).
PROBE_TIMEOUT_S = 1.0


def triton_backend_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``Sam3Pipeline.from_bundle`` (engines.factory) when the backend is triton."""
    if settings.backend != "triton":
        return {}
    return {
        "triton": {
            "url": settings.triton_url,
            "prefix": settings.triton_model_prefix,
            "timeout_s": settings.triton_timeout_s,
            "wait_s": settings.triton_wait_s,
        }
    }


async def backend_unavailable(pipeline: Any) -> str | None:
    """Why a loaded pipeline's backend cannot serve now, or None (local backends: always None)."""
    backend = getattr(pipeline, "backend", None)
    ready = getattr(backend, "ready", None)
    if not callable(ready):
        return None
    if await to_thread.run_sync(ready, PROBE_TIMEOUT_S):
        return None
    return f"the inference backend ({getattr(backend, 'device', 'remote')}) does not answer ready"
