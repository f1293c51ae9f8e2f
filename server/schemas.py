"""Request and response models: what /openapi.json documents and what the routes really return.

Routes return these response models (FastAPI validates them on the way out), so a response that
drifts from its documented shape is a 500 in the tests, not a surprise for a client. Request
bounds come from ``engines.options`` (one set of limits for the pipeline, the CLI and the API).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from engines.options import MIN_DETECTIONS, THRESHOLD_MAX, THRESHOLD_MIN

MaskFormat = Literal["rle", "png", "polygon", "none"]


class _Response(BaseModel):
    # extra="forbid": a field the model does not declare is a bug in the server, not in the client.
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------
class SegmentOptionsModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    score_threshold: float = Field(
        0.5, ge=THRESHOLD_MIN, le=THRESHOLD_MAX, description="Keep detections scoring at least this."
    )
    mask_threshold: float = Field(0.5, ge=THRESHOLD_MIN, le=THRESHOLD_MAX, description="Mask probability cut-off.")
    max_detections: int | None = Field(
        None, ge=MIN_DETECTIONS, description="Detections per prompt (server cap if unset)."
    )
    mask_format: MaskFormat = "rle"


class SegmentJSON(SegmentOptionsModel):
    """JSON form of POST /segment: exactly one of ``image`` (base64) or ``image_id``."""

    image: str | None = Field(None, description="Base64 image bytes (a data: URL prefix is accepted).")
    image_id: str | None = Field(None, description="sha256 of an image already embedded (POST /embed or /segment).")
    prompts: list[str] = Field(..., description="Text prompts; one result per prompt, in order.")


class EmbedJSON(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(..., description="Base64 image bytes.")


class SegmentMultipart(BaseModel):
    """Multipart form of POST /segment, for the OpenAPI document; server/requests.py reads the
    form itself (streamed, size-bounded) and validates the options with SegmentOptionsModel."""

    image: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    image_id: str | None = None
    prompt: list[str] = Field(..., description="Repeat the field for several prompts.")
    score_threshold: float = Field(0.5, ge=THRESHOLD_MIN, le=THRESHOLD_MAX)
    mask_threshold: float = Field(0.5, ge=THRESHOLD_MIN, le=THRESHOLD_MAX)
    max_detections: int | None = Field(None, ge=MIN_DETECTIONS)
    mask_format: MaskFormat = "rle"


class EmbedMultipart(BaseModel):
    """Multipart form of POST /embed (for the OpenAPI document, as SegmentMultipart)."""

    image: bytes = Field(..., json_schema_extra={"format": "binary"})


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------
class ImageSizeOut(_Response):
    width: int
    height: int


class RleMask(_Response):
    format: Literal["rle"]
    size: list[int] = Field(..., description="[height, width]")
    counts: str = Field(..., description="COCO compressed RLE")


class PngMask(_Response):
    format: Literal["png"]
    size: list[int] = Field(..., description="[height, width]")
    data: str = Field(..., description="base64 PNG, 0/255")


class PolygonMask(_Response):
    format: Literal["polygon"]
    size: list[int] = Field(..., description="[height, width]")
    polygons: list[list[int]] = Field(..., description="[[x, y, x, y, ...], ...] outer contours")


Mask = Annotated[Union[RleMask, PngMask, PolygonMask], Field(discriminator="format")]


class DetectionOut(_Response):
    score: float
    box: list[float] = Field(..., min_length=4, max_length=4, description="[x0, y0, x1, y1] in original-image pixels.")
    mask: Mask | None = None


class PromptResultOut(_Response):
    prompt: str
    detections: list[DetectionOut]


class Timings(_Response):
    """Milliseconds per stage of one request; a stage the request did not run counts 0."""

    queue: float = Field(..., description="Waiting for the inference worker.")
    image_encoder: float = Field(..., description="Pixel preparation + image encoder (0 on a cache hit).")
    text_encoder: float = Field(..., description="Tokenizer + text encoder for prompts not in the text cache.")
    decoder: float = Field(..., description="The decoder, all prompts in one call per max batch.")
    postprocess: float = Field(..., description="Masks upsampled, thresholded and encoded.")
    total: float = Field(..., description="Request received to response ready.")


# The stages a response reports, in order (metrics label them the same way).
RESPONSE_STAGES: tuple[str, ...] = tuple(Timings.model_fields)


class ModelOut(_Response):
    name: str
    backend: str
    precision: str


class SegmentResponse(_Response):
    image_id: str = Field(..., description="sha256 hex of the image bytes.")
    image_size: ImageSizeOut
    cache_hit: bool
    results: list[PromptResultOut]
    timings_ms: Timings
    model: ModelOut


class EmbedResponse(_Response):
    image_id: str
    image_size: ImageSizeOut
    cached: bool = Field(..., description="True if the embedding was already cached (no encoder run).")


class DeleteResponse(_Response):
    image_id: str
    deleted: bool


class HealthResponse(_Response):
    status: Literal["ok"]
    state: str


class ReadyResponse(_Response):
    state: Literal["ready"]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class NotReadyResponse(BaseModel):
    state: str
    error: ErrorDetail


class CacheOut(_Response):
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity_bytes: int
    in_flight: int
    dtype: str


class TextCacheOut(_Response):
    hits: int
    misses: int
    evictions: int
    entries: int
    capacity_entries: int


class QueueOut(_Response):
    capacity: int
    depth: int


class WorkerOut(_Response):
    completed: int
    failed: int
    skipped_expired: int
    rejected_full: int
    timed_out: int
    run_s_ewma: float


class LimitsOut(_Response):
    max_upload_bytes: int
    max_megapixels: float
    max_prompts: int
    max_prompt_chars: int
    max_detections: int
    request_timeout_s: float
    allowed_content_types: list[str]


class PartOut(_Response):
    file: str
    sha256: str
    max_batch: int


class SourceOut(_Response):
    checkpoint: str
    checkpoint_sha256: str
    format: str
    loras: list[dict[str, Any]]


class TokenizerOut(_Response):
    context_length: int
    sha256: str


class CapabilitiesOut(_Response):
    text_prompts: bool
    exemplar_boxes: bool = Field(description="The bundle has the exemplar (box-prompt) graphs.")
    max_boxes: int = Field(description="Exemplar boxes one prompt may hold (0: text prompts only).")


class ManifestOut(_Response):
    name: str
    card: dict[str, Any] = Field(default_factory=dict, description="The bundle's model card ({} when none).")
    schema_version: int
    architecture: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_queries: int
    mask_size: list[int]
    parameters: dict[str, int]
    tokenizer: TokenizerOut
    parts: dict[str, PartOut]
    source: SourceOut
    capabilities: CapabilitiesOut


class InfoResponse(_Response):
    state: str
    error: str | None
    model: ModelOut
    cache: CacheOut
    text_cache: TextCacheOut
    queue: QueueOut
    worker: WorkerOut
    limits: LimitsOut
    stage_calls: dict[str, int]
    manifest: ManifestOut | None = None
