"""The app factory: settings in, a FastAPI app with its worker, caches, metrics and routes out.

The pipeline is built on the worker thread (GPU contexts are thread-bound) by
:func:`load_pipeline`, which hands the server's settings to the runtime: the runtime decides the
backend (engines/factory.py), the limits are the settings' values. Nothing here imports torch or
export/: this process is what runs on the Jetson.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from engines.factory import plan_precision
from engines.errors import BundleError
from engines.options import Limits, SegmentOptions
from engines.types import ImageEmbedding, LoadedImage, TextEmbedding
from server.auth import ApiKeys
from server.cache import EmbeddingCache, TextCache
from server.demo import router as demo_router
from server.errors import install_error_handler
from server.metrics import Metrics
from server.image_ids import ImageIds, load_secret
from server.middleware import (
    AdmissionMiddleware,
    BodyLimitMiddleware,
    CORSMiddleware,
    MetricsMiddleware,
    TrustedHostMiddleware,
)
from server.routes import api, probes, stage_calls
from server.schemas import RequestLimits, request_models
from server.service import SegmentService
from server.stream_routes import streams_api
from server.streams import StreamManager
from server.settings import Settings
from server.triton import triton_backend_options
from server.worker import STATES, InferenceWorker, PipelineFactory

if TYPE_CHECKING:
    from engines.pipeline import Sam3Pipeline

log = logging.getLogger("server")


def limits(settings: Settings) -> Limits:
    """The pipeline's limits are the server's settings."""
    return Limits(
        max_megapixels=settings.max_megapixels,
        max_prompts=settings.max_prompts,
        max_prompt_chars=settings.max_prompt_chars,
        max_detections=settings.max_detections,
    )


def request_limits(settings: Settings, max_boxes: int | None = None) -> RequestLimits:
    """What this server accepts: its request models, /openapi.json and /info carry these."""
    return RequestLimits(
        max_upload_bytes=settings.max_upload_bytes,
        max_megapixels=settings.max_megapixels,
        max_prompts=settings.max_prompts,
        max_prompt_chars=settings.max_prompt_chars,
        max_detections=settings.max_detections,
        max_masks=settings.max_masks,
        request_timeout_s=settings.request_timeout_s,
        allowed_content_types=list(settings.allowed_content_types),
        max_boxes=max_boxes,
    )


def load_pipeline(settings: Settings, on_state: Callable[[str], None]) -> Sam3Pipeline:
    """``Sam3Pipeline.from_bundle`` with the server's settings; reports ``building_engines``
    while the TensorRT backend builds missing plans (minutes on a Jetson's first start)."""
    from engines.pipeline import Sam3Pipeline  # the runtime loads on the worker thread

    if settings.bundle is None:
        raise BundleError("no bundle: pass --bundle DIR or set SAM3_BUNDLE")
    pipeline = Sam3Pipeline.from_bundle(
        settings.bundle,
        settings.backend,
        limits=limits(settings),
        precision=plan_precision(settings.backend, settings.precision),  # SAM3_PRECISION: plans only
        engines_dir=settings.engines_dir,
        on_build=lambda part: on_state("building_engines"),
        **triton_backend_options(settings),  # --backend triton: url, prefix, timeouts (server/triton.py)
    )
    on_state("loading")
    log.info(
        "loaded bundle %s (backend %s, precision %s)",
        settings.bundle, pipeline.backend.kind, pipeline.backend.precision,
    )  # fmt: skip
    return pipeline


def warm_up(pipeline: Sam3Pipeline) -> None:
    """One small end-to-end inference: lazy allocations and kernel selection happen now."""
    image = LoadedImage(pixels=np.full((64, 64, 3), 127, dtype=np.uint8), image_id="warmup")
    pipeline.segment(image, ["warm up"], SegmentOptions(score_threshold=1.0, max_detections=1))


def create_app(
    settings: Settings,
    pipeline_factory: PipelineFactory[Sam3Pipeline] | None = None,
    on_load_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. ``pipeline_factory`` is injectable so tests can run the server without a GPU;
    ``on_load_failure(message)`` is called (on the worker thread) if the bundle cannot be loaded
    (``python -m server`` then exits with that one line)."""
    metrics = Metrics()
    text_cache: TextCache[TextEmbedding] = TextCache(settings.text_cache_entries)
    build = pipeline_factory or (lambda on_state: load_pipeline(settings, on_state))

    def factory(on_state: Callable[[str], None]) -> Sam3Pipeline:
        pipeline = build(on_state)
        # Text embeddings depend on the text encoder and the tokenizer: never reuse another's.
        text_cache.namespace = pipeline.text_encoder_key
        return pipeline

    worker: InferenceWorker[Sam3Pipeline] = InferenceWorker(
        factory,
        queue_size=settings.queue_size,
        warmup=warm_up if settings.warmup else None,
        concurrency=settings.triton_concurrency if settings.backend == "triton" else 1,
        on_failed=on_load_failure,
    )
    image_cache: EmbeddingCache[ImageEmbedding] = EmbeddingCache(settings.cache_bytes, lambda e: e.nbytes)
    service = SegmentService(settings, worker, image_cache, text_cache, metrics, ImageIds(load_secret(settings)))
    streams = StreamManager(settings, service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            # uvicorn has already stopped accepting connections and waited for open requests;
            # streams stop first (their feeds end), then jobs still queued run to completion.
            await streams.close()
            await worker.stop(settings.shutdown_timeout_s)
            service.cpu.close()

    app = FastAPI(
        title="SAM3 edge segmentation",
        version="0.1.0",
        description="Text-prompted segmentation (SAM3) with an image-embedding cache. See server/README.md.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    # The bodies' parser takes box prompts whatever the bundle (the pipeline answers for them).
    app.state.requests = request_models(request_limits(settings))
    app.state.worker = worker
    app.state.service = service
    app.state.streams = streams
    app.state.metrics = metrics
    app.state.api_keys = ApiKeys(settings)

    def snapshot() -> dict[str, object]:
        return {
            "queue_depth": worker.depth,
            "queue_capacity": worker.queue_size,
            "state": worker.state,
            "states": STATES,
            "image_cache": image_cache.stats().to_json(),
            "text_cache": text_cache.stats(),
            "stage_calls": stage_calls(service),
            "admission": service.admission(),
            "streams": [s.describe() for s in streams.streams.values()],
        }  # fmt: skip

    metrics.add_state_collector(snapshot)
    install_error_handler(app)
    app.include_router(api)
    app.include_router(streams_api)
    app.include_router(probes)
    app.include_router(demo_router)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes_of=lambda: settings.max_body_bytes, body_timeout_s=settings.body_timeout_s
    )
    # Same origin only unless origins are listed: a refused preflight is a 400 with the usual body.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["X-API-Key", "Content-Type", "X-Image-Id"],
        expose_headers=["Retry-After"],
        max_age=600,
    )
    if settings.trusted_hosts:
        app.add_middleware(TrustedHostMiddleware, hosts=settings.trusted_hosts)
    app.add_middleware(AdmissionMiddleware, admit=service.admit)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    _document(app, settings, service)
    return app


# The operations an API key opens (server/auth.py), as /openapi.json lists them.
_KEYED = {("/segment", "post"), ("/embed", "post"), ("/embeddings/{image_id}", "delete"), ("/info", "get"),
          ("/streams", "post"), ("/streams", "get"), ("/streams/{stream_id}", "get"),
          ("/streams/{stream_id}", "delete"), ("/streams/{stream_id}/events", "get"),
          ("/streams/{stream_id}/mjpeg", "get")}


def _document(app: FastAPI, settings: Settings, service: SegmentService) -> None:
    """/openapi.json as this server is configured: the request models with its limits
    (server/schemas.py ``request_models``), exemplar entries where the loaded pipeline can run them, and the
    X-API-Key requirement exactly where keys are checked. Kept once the pipeline has loaded."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            pipeline = service.pipeline
            models = request_models(request_limits(settings, int(getattr(pipeline, "max_boxes", 0))))
            bodies, components = models.openapi()
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            for path, name in (("/segment", "segment"), ("/embed", "embed"), ("/streams", "streams")):
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": bodies[name]}
            schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
            keyed = set(_KEYED) | ({("/metrics", "get")} if settings.metrics_need_key else set())
            if settings.keys():
                schema.setdefault("components", {})["securitySchemes"] = {
                    "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
                }
                for path, method in keyed:
                    schema["paths"][path][method]["security"] = [{"ApiKey": []}]
            else:  # no key configured: nobody gets a 401
                for path, method in keyed:
                    schema["paths"][path][method].get("responses", {}).pop("401", None)
            if pipeline is None:
                return schema  # not loaded yet: what it accepts is not known, ask again later
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
