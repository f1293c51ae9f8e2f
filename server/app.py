"""The FastAPI app: thin routes over :class:`server.service.SegmentService`.

Routes parse the request (multipart or JSON), call the service and return its dict; every
failure is a typed exception mapped by the one handler in server/errors.py. Nothing here
imports torch or export/: this process is what runs on the Jetson.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engines.errors import InvalidImage, InvalidPrompt
from engines.types import ImageEmbedding, TextEmbedding
from server.cache import EmbeddingCache, TextCache
from server.errors import (
    BadRequest,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    error_body,
    install_error_handler,
)
from server.metrics import Metrics
from server.service import SegmentOptions, SegmentService
from server.settings import Settings
from server.worker import STATES, InferenceWorker, PipelineFactory

log = logging.getLogger("server")
STATIC_DIR = Path(__file__).parent / "static"


# --------------------------------------------------------------------------------------------
# Request / response models (they document the API in /openapi.json)
# --------------------------------------------------------------------------------------------
class SegmentOptionsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Keep detections scoring at least this.")
    mask_threshold: float = Field(0.5, ge=0.0, le=1.0, description="Mask probability cut-off.")
    max_detections: int | None = Field(None, ge=1, description="Detections per prompt (server cap if unset).")
    mask_format: Literal["rle", "png", "polygon", "none"] = "rle"


class SegmentJSON(SegmentOptionsModel):
    """JSON form of POST /segment: exactly one of ``image`` (base64) or ``image_id``."""

    image: str | None = Field(None, description="Base64 image bytes (a data: URL prefix is accepted).")
    image_id: str | None = Field(None, description="sha256 of an image already embedded (POST /embed or /segment).")
    prompts: list[str] = Field(..., description="Text prompts; one result per prompt, in order.")


class EmbedJSON(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(..., description="Base64 image bytes.")


class SegmentMultipart(BaseModel):
    """Multipart form of POST /segment (documentation only: parsed by hand, see _read_multipart)."""

    image: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    image_id: str | None = None
    prompt: list[str] = Field(..., description="Repeat the field for several prompts.")
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int | None = None
    mask_format: Literal["rle", "png", "polygon", "none"] = "rle"


class EmbedMultipart(BaseModel):
    image: bytes = Field(..., json_schema_extra={"format": "binary"})


class ImageSize(BaseModel):
    width: int
    height: int


class DetectionOut(BaseModel):
    score: float
    box: list[float] = Field(..., description="[x0, y0, x1, y1] in original-image pixels.")
    mask: dict[str, Any] | None = Field(None, description='e.g. {"format": "rle", "size": [H, W], "counts": str}')


class PromptResultOut(BaseModel):
    prompt: str
    detections: list[DetectionOut]


class Timings(BaseModel):
    queue: float
    image_encoder: float
    text_encoder: float
    decoder: float
    postprocess: float
    total: float


class ModelOut(BaseModel):
    name: str
    backend: str
    precision: str


class SegmentResponse(BaseModel):
    image_id: str = Field(..., description="sha256 hex of the image bytes.")
    image_size: ImageSize
    cache_hit: bool
    results: list[PromptResultOut]
    timings_ms: Timings
    model: ModelOut


class EmbedResponse(BaseModel):
    image_id: str
    image_size: ImageSize
    cached: bool = Field(..., description="True if the embedding was already cached (no encoder run).")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in {
        400: "Malformed body",
        401: "Missing or wrong X-API-Key",
        404: "image_not_cached",
        413: "Upload or image too large",
        415: "Unsupported content type",
        422: "Invalid prompt, option or image",
        429: "Queue full (see Retry-After)",
        503: "Engines not ready",
        504: "Deadline exceeded",
    }.items()
}


def _body_doc(multipart: type[BaseModel], json_model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart.model_json_schema()},
                "application/json": {"schema": json_model.model_json_schema()},
            },
        }
    }


# --------------------------------------------------------------------------------------------
# Dependencies
# --------------------------------------------------------------------------------------------
def get_service(request: Request) -> SegmentService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def require_api_key(request: Request) -> None:
    """Off unless SAM3_API_KEY is set; constant-time compare so timing leaks nothing."""
    expected = request.app.state.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.get_secret_value().encode()):
        raise Unauthorized("missing or wrong X-API-Key")


# --------------------------------------------------------------------------------------------
# Body parsing
# --------------------------------------------------------------------------------------------
class _NonUtf8Field(MultiPartException):
    pass


class _StrictMultiPartParser(MultiPartParser):
    """Starlette decodes bad UTF-8 in text fields as latin-1 silently; a prompt must not be."""

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode(self._charset or "utf-8")
            except (UnicodeDecodeError, LookupError):
                raise _NonUtf8Field(f"form field {part.field_name!r} is not valid UTF-8") from None
        super().on_part_end()


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def _read_multipart(request: Request, settings: Settings) -> tuple[dict[str, Any], bytes | None]:
    parser = _StrictMultiPartParser(
        request.headers,
        request.stream(),
        max_files=1,
        max_fields=settings.max_prompts + 16,
        max_part_size=max(1024 * 1024, settings.max_prompt_chars * 8),
    )
    try:
        form = await parser.parse()
    except _NonUtf8Field as exc:
        raise InvalidPrompt(exc.message) from None
    except MultiPartException as exc:
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    try:
        fields: dict[str, Any] = {}
        data: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise BadRequest(f"unexpected file field {key!r}; send the image as 'image'")
                declared = (value.content_type or "application/octet-stream").split(";")[0].strip().lower()
                if declared not in settings.allowed_content_types:
                    raise UnsupportedMediaType(
                        f"image content type {declared!r} is not accepted "
                        f"(accepted: {', '.join(settings.allowed_content_types)})"
                    )
                data = await value.read(settings.max_upload_bytes + 1)
            elif key in ("prompt", "prompts"):
                fields.setdefault("prompts", []).append(value)
            elif key == "image":
                raise BadRequest("'image' must be a file part (curl -F image=@photo.jpg)")
            else:
                if key in fields:
                    raise BadRequest(f"field {key!r} given twice")
                fields[key] = value
        return fields, data
    finally:
        await form.close()


def _decode_base64(text: str, settings: Settings) -> bytes:
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    text = "".join(text.split())
    if len(text) * 3 // 4 > settings.max_upload_bytes + 3:
        raise PayloadTooLarge(f"image of ~{len(text) * 3 // 4} bytes; at most {settings.max_upload_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("'image' is not valid base64") from None


async def _read_json(request: Request) -> bytes:
    body = await request.body()
    if not body:
        raise BadRequest("empty request body")
    return body


_FORM_NUMBERS = {"score_threshold": float, "mask_threshold": float, "max_detections": int}


def _form_options(fields: dict[str, Any]) -> dict[str, Any]:
    """Form values are strings; convert before the (strict) model sees them."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        convert = _FORM_NUMBERS.get(key)
        if convert is not None:
            try:
                out[key] = convert(value)
            except ValueError:
                out[key] = value  # the model reports it as a validation error
        else:
            out[key] = value
    return out


def _options(model: SegmentOptionsModel, settings: Settings) -> SegmentOptions:
    return SegmentOptions(
        score_threshold=model.score_threshold,
        mask_threshold=model.mask_threshold,
        max_detections=model.max_detections or settings.max_detections,
        mask_format=model.mask_format,
    )


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------
api = APIRouter(dependencies=[Depends(require_api_key)], responses=_ERRORS)
probes = APIRouter()


@api.post(
    "/segment",
    response_model=SegmentResponse,
    openapi_extra=_body_doc(SegmentMultipart, SegmentJSON),
    summary="Segment an image with text prompts",
)
async def segment(
    request: Request,
    service: SegmentService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> JSONResponse:
    media = _media_type(request)
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, settings)
        prompts = fields.pop("prompts", [])
        image_id = fields.pop("image_id", None)
        options = SegmentOptionsModel.model_validate(_form_options(fields))
    elif media == "application/json" or media.endswith("+json"):
        parsed = SegmentJSON.model_validate_json(await _read_json(request))
        prompts, image_id = parsed.prompts, parsed.image_id
        data = _decode_base64(parsed.image, settings) if parsed.image is not None else None
        options = parsed
    else:
        raise UnsupportedMediaType("POST /segment takes multipart/form-data or application/json")
    if (data is None) == (image_id is None):
        raise BadRequest("send exactly one of 'image' or 'image_id'") if data is not None else InvalidImage(
            "an 'image' or an 'image_id' is required"
        )
    body = await service.segment(data=data, image_id=image_id, prompts=prompts, options=_options(options, settings))
    return JSONResponse(body)


@api.post(
    "/embed",
    response_model=EmbedResponse,
    openapi_extra=_body_doc(EmbedMultipart, EmbedJSON),
    summary="Compute and cache an image embedding",
)
async def embed(
    request: Request,
    service: SegmentService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> JSONResponse:
    media = _media_type(request)
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, settings)
        if fields:
            raise BadRequest(f"unexpected fields {sorted(fields)}; POST /embed takes only 'image'")
    elif media == "application/json" or media.endswith("+json"):
        data = _decode_base64(EmbedJSON.model_validate_json(await _read_json(request)).image, settings)
    else:
        raise UnsupportedMediaType("POST /embed takes multipart/form-data or application/json")
    if data is None:
        raise InvalidImage("an 'image' file is required")
    return JSONResponse(await service.embed(data))


@api.delete("/embeddings/{image_id}", summary="Drop an image embedding from the cache")
async def delete_embedding(image_id: str, service: SegmentService = Depends(get_service)) -> dict[str, Any]:
    service.delete(image_id)
    return {"image_id": image_id, "deleted": True}


@api.get("/info", summary="Model, backend, limits, cache and stage counters")
async def info(request: Request, service: SegmentService = Depends(get_service)) -> dict[str, Any]:
    return _info(request.app, service)


@probes.get("/healthz", summary="Process is up (not necessarily ready)")
async def healthz(request: Request) -> dict[str, str]:
    return {"status": "ok", "state": request.app.state.worker.state}


@probes.get(
    "/readyz",
    summary="Engines loaded and warmed",
    responses={503: {"description": 'Not ready: {"state": ..., "error": {...}}'}},
)
async def readyz(request: Request) -> JSONResponse:
    worker = request.app.state.worker
    if worker.state == "ready":
        return JSONResponse({"state": "ready"})
    message = worker.error or f"engines are {worker.state.replace('_', ' ')}"
    return JSONResponse(
        {"state": worker.state, **error_body("not_ready", message)}, status_code=503, headers={"Retry-After": "5"}
    )


@probes.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@probes.get("/", include_in_schema=False, response_class=HTMLResponse)
async def demo_page() -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))


def _info(app: FastAPI, service: SegmentService) -> dict[str, Any]:
    worker, settings = app.state.worker, app.state.settings
    pipeline = worker.pipeline
    out: dict[str, Any] = {
        "state": worker.state,
        "error": worker.error,
        "model": service.model_info(),
        "cache": {**service.image_cache.stats().to_json(), "dtype": service.cache_dtype()},
        "text_cache": service.text_cache.stats(),
        "queue": {"capacity": worker.queue_size, "depth": worker.depth},
        "worker": {k: v for k, v in vars(worker.stats).items() if k != "extra"},
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_megapixels": settings.max_megapixels,
            "max_prompts": settings.max_prompts,
            "max_prompt_chars": settings.max_prompt_chars,
            "max_detections": settings.max_detections,
            "request_timeout_s": settings.request_timeout_s,
            "allowed_content_types": list(settings.allowed_content_types),
        },
        "stage_calls": _stage_calls(pipeline),
    }
    if pipeline is not None:
        out["manifest"] = _manifest_summary(pipeline.manifest)
    return out


def _stage_calls(pipeline: Any) -> dict[str, int]:
    calls = getattr(pipeline, "stage_calls", None) if pipeline is not None else None
    return {str(k): int(v) for k, v in dict(calls or {}).items()}


def _manifest_summary(manifest: Any) -> dict[str, Any]:
    model = manifest.model
    return {
        "name": manifest.name,
        "schema_version": manifest.schema_version,
        "architecture": model.architecture,
        "image_size": model.image_size,
        "patch_size": model.patch_size,
        "hidden_size": model.hidden_size,
        "num_queries": model.num_queries,
        "mask_size": list(model.mask_size),
        "parameters": dict(model.parameters),
        "tokenizer": {"context_length": manifest.tokenizer.context_length, "sha256": manifest.tokenizer.sha256},
        "parts": {
            name: {"file": part.file, "sha256": part.sha256, "max_batch": part.max_batch}
            for name, part in manifest.parts.items()
        },
        "source": {
            "checkpoint": manifest.source.checkpoint,
            "checkpoint_sha256": manifest.source.checkpoint_sha256,
            "format": manifest.source.format,
            "loras": list(manifest.source.loras),
        },
    }


# --------------------------------------------------------------------------------------------
# ASGI middleware (pure ASGI: no per-request task or body buffering)
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------
def default_pipeline_factory(settings: Settings) -> PipelineFactory[Any]:
    """Build Sam3Pipeline from the bundle on the worker thread (GPU contexts are thread-bound)."""

    def build(on_state: Callable[[str], None]) -> Any:
        from server.loading import load_pipeline

        return load_pipeline(settings, on_state)

    return build


def warm_up(pipeline: Any) -> None:
    """One tiny inference so the first user request doesn't pay lazy allocations/autotuning."""
    from server.loading import warm_up as _warm

    _warm(pipeline)


def create_app(settings: Settings, pipeline_factory: PipelineFactory[Any] | None = None) -> FastAPI:
    """Build the app. ``pipeline_factory`` is injectable so tests can run the server without a GPU."""
    metrics = Metrics()
    text_cache: TextCache[TextEmbedding] = TextCache(settings.text_cache_entries)
    build = pipeline_factory or default_pipeline_factory(settings)

    def factory(on_state: Callable[[str], None]) -> Any:
        from server.loading import tokenizer_hash

        pipeline = build(on_state)
        text_cache.tokenizer_hash = tokenizer_hash(pipeline)
        return pipeline

    worker: InferenceWorker[Any] = InferenceWorker(
        factory,
        queue_size=settings.queue_size,
        warmup=warm_up if settings.warmup else None,
    )
    image_cache: EmbeddingCache[ImageEmbedding] = EmbeddingCache(settings.cache_bytes, lambda e: e.nbytes)
    service = SegmentService(settings, worker, image_cache, text_cache, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            # uvicorn has already stopped accepting connections and waited for open requests;
            # jobs still queued run to completion before the thread ends.
            await worker.stop(settings.shutdown_timeout_s)

    app = FastAPI(
        title="SAM3 edge segmentation",
        version="0.1.0",
        description="Text-prompted segmentation (SAM3) with an image-embedding cache. See server/README.md.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.worker = worker
    app.state.service = service
    app.state.metrics = metrics

    def snapshot() -> dict[str, Any]:
        return {
            "queue_depth": worker.depth,
            "queue_capacity": worker.queue_size,
            "state": worker.state,
            "states": STATES,
            "image_cache": image_cache.stats().to_json(),
            "text_cache": text_cache.stats(),
            "stage_calls": _stage_calls(worker.pipeline),
        }

    metrics.add_state_collector(snapshot)
    install_error_handler(app)
    app.include_router(api)
    app.include_router(probes)
    app.add_middleware(BodyLimitMiddleware, max_bytes_of=lambda: settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app
