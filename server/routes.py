"""The routes: parse (server/bodies.py), call the service, shape a response model.

``api`` needs the API key when one is set; ``probes`` (health, readiness, metrics, the demo page)
never do, so Docker's healthcheck works without the key. Every failure is a typed exception
mapped by the one handler in server/errors.py.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Any

from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engines.options import SegmentOptions
from server.bodies import read_embed_request, read_segment_request
from server.auth import require_api_key, require_metrics_key
from server.errors import error_body
from server.image_ids import ID_PATTERN
from server.schemas import (
    DeleteResponse,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    NotReadyResponse,
    ReadyResponse,
    RequestModels,
    SegmentResponse,
)
from server.service import SegmentService
from server.triton import backend_unavailable
from server.worker import InferenceWorker

STATIC_DIR = FilePath(__file__).parent / "static"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed body",
        401: "Missing or wrong X-API-Key",
        404: "image_not_cached",
        408: "The body did not arrive within SAM3_BODY_TIMEOUT_S",
        413: "Upload or image too large",
        415: "Unsupported content type",
        422: "Invalid prompt, option or image",
        429: "Queue full (see Retry-After)",
        503: "Engines not ready",
        504: "Deadline exceeded",
    }.items()
}


# --------------------------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------------------------
def get_service(request: Request) -> SegmentService:
    service: SegmentService = request.app.state.service
    return service


def get_requests(request: Request) -> RequestModels:
    models: RequestModels = request.app.state.requests
    return models


def get_worker(request: Request) -> InferenceWorker[Any]:
    worker: InferenceWorker[Any] = request.app.state.worker
    return worker


api = APIRouter(dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
probes = APIRouter()


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------
@api.post(
    "/segment",
    response_model=SegmentResponse,
    summary="Segment an image with text prompts, exemplar boxes or both",
)
async def segment(
    request: Request,
    service: SegmentService = Depends(get_service),
    models: RequestModels = Depends(get_requests),
    namespace: str = Depends(require_api_key),
) -> dict[str, Any]:
    # Admitted by AdmissionMiddleware before the body is read: a full server reads nothing.
    body = await read_segment_request(request, models, service.cpu)
    chosen = body.options
    options = SegmentOptions(
        score_threshold=chosen.score_threshold,
        mask_threshold=chosen.mask_threshold,
        max_detections=chosen.max_detections,  # None: the server's cap (SAM3_MAX_DETECTIONS)
        with_masks=chosen.mask_format != "none",
    )
    done = await service.segment(
        data=body.data, image_id=body.image_id, prompts=body.prompts, options=options,
        mask_format=chosen.mask_format, namespace=namespace,
    )  # fmt: skip
    # A dict, validated once against SegmentResponse by FastAPI on the way out (a model built
    # here would be validated twice: masks make this body the largest the server sends).
    return {
        "image_id": done.image_id,
        "image_size": done.image_size._asdict(),
        "cache_hit": done.cache_hit,
        "results": done.document["results"],
        "timings_ms": done.timings_ms,
        "model": vars(done.model),
    }


@api.post(
    "/embed",
    response_model=EmbedResponse,
    summary="Compute and cache an image embedding",
)
async def embed(
    request: Request,
    service: SegmentService = Depends(get_service),
    models: RequestModels = Depends(get_requests),
    namespace: str = Depends(require_api_key),
) -> EmbedResponse:
    done = await service.embed(await read_embed_request(request, models, service.cpu), namespace)
    return EmbedResponse.model_validate(
        {"image_id": done.image_id, "image_size": done.image_size._asdict(), "cached": done.cached}
    )


@api.delete("/embeddings/{image_id}", response_model=DeleteResponse, summary="Drop an image embedding from the cache")
async def delete_embedding(
    image_id: str = Path(..., pattern=ID_PATTERN, description="An image_id this API key received."),
    service: SegmentService = Depends(get_service),
    namespace: str = Depends(require_api_key),
) -> DeleteResponse:
    service.delete(image_id, namespace)
    return DeleteResponse(image_id=image_id, deleted=True)


@api.get("/info", response_model=InfoResponse, summary="Model, backend, limits, cache and stage counters")
async def info(
    service: SegmentService = Depends(get_service),
    models: RequestModels = Depends(get_requests),
    worker: InferenceWorker[Any] = Depends(get_worker),
) -> InfoResponse:
    pipeline = service.pipeline
    return InfoResponse.model_validate(
        {
            "state": worker.state,
            "error": worker.error,
            "model": vars(service.model_identity()),
            "cache": {**service.image_cache.stats().to_json(), "dtype": service.cache_dtype()},
            "text_cache": service.text_cache.stats(),
            "queue": {"capacity": worker.queue_size, "depth": worker.depth},
            "admission": service.admission(),
            "worker": {k: v for k, v in vars(worker.stats).items() if k != "extra"},
            "limits": models.limits.info(),
            "stage_calls": stage_calls(service),
            "manifest": None if pipeline is None else pipeline.manifest.summary(),
        }
    )


def stage_calls(service: SegmentService) -> dict[str, int]:
    """Engine runs per part since start (/info and /metrics)."""
    pipeline = service.pipeline
    return {} if pipeline is None else {str(k): int(v) for k, v in pipeline.stage_calls.items()}


# --------------------------------------------------------------------------------------------
# Probes and pages (no API key)
# --------------------------------------------------------------------------------------------
@probes.get("/healthz", response_model=HealthResponse, summary="Process is up (not necessarily ready)")
async def healthz(worker: InferenceWorker[Any] = Depends(get_worker)) -> HealthResponse:
    return HealthResponse(status="ok", state=worker.state)


@probes.get(
    "/readyz",
    response_model=ReadyResponse,
    summary="Engines loaded and warmed",
    responses={503: {"model": NotReadyResponse, "description": 'Not ready: {"state": ..., "error": {...}}'}},
)
async def readyz(worker: InferenceWorker[Any] = Depends(get_worker)) -> ReadyResponse | JSONResponse:
    if worker.state == "ready":
        # Remote engines (--backend triton) can vanish after loading: ask them on every probe.
        unavailable = await backend_unavailable(worker.pipeline)
        if unavailable is None:
            return ReadyResponse(state="ready")
        body = NotReadyResponse.model_validate({"state": worker.state, **error_body("backend_unavailable", unavailable)})
        return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})
    message = worker.error or f"engines are {worker.state.replace('_', ' ')}"
    body = NotReadyResponse.model_validate({"state": worker.state, **error_body("not_ready", message)})
    return JSONResponse(body.model_dump(), status_code=503, headers={"Retry-After": "5"})


@probes.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}},
               401: {"model": ErrorResponse, "description": "SAM3_METRICS_NEED_KEY: missing or wrong X-API-Key"}},
)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@probes.get("/", include_in_schema=False, response_class=HTMLResponse)
async def demo_page() -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))
