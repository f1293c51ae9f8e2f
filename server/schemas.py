"""Request and response models: what /openapi.json documents and what the routes really return.

Routes return these response models (FastAPI validates them on the way out), so a response that
drifts from its documented shape is a 500 in the tests, not a surprise for a client. Request
bounds come from ``engines.options`` (one set of limits for the pipeline, the CLI and the API).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engines.options import MIN_DETECTIONS, THRESHOLD_MAX, THRESHOLD_MIN
from engines.tokenizer import INVISIBLE_CHARS, REJECTED_CHARS
from server.image_ids import ID_PATTERN

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

    @field_validator("max_detections", mode="before")
    @classmethod
    def _integral_number(cls, value: object) -> object:
        # JSON Schema's "integer" is any number without a fraction: 32.0 is 32 (strict mode
        # would refuse it), "32" and true stay refused.
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return value


class ExemplarEntry(BaseModel):
    """A prompt given by exemplar boxes, with or without text: "find everything like this box"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(None, description="Optional text; without it the model is told \"visual\".")
    boxes: list[list[float]] = Field(..., description="Boxes as pixel [x0, y0, x1, y1] of the original image.")
    labels: list[int] | None = Field(None, description="1 positive, 0 negative, one per box (default: all 1).")


class SegmentJSON(SegmentOptionsModel):
    """JSON form of POST /segment: exactly one of ``image`` (base64) or ``image_id``."""

    image: str | None = Field(None, description="Base64 image bytes (a data: URL prefix is accepted).")
    image_id: str | None = Field(None, description="The image_id of an image already embedded (POST /embed or /segment).")
    prompts: list[str | ExemplarEntry] = Field(
        ..., description="Text prompts or exemplar entries; one result per prompt, in order.")


class EmbedJSON(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    image: str = Field(..., description="Base64 image bytes.")


def request_bodies(
    *,
    max_upload_bytes: int,
    max_prompts: int,
    max_prompt_chars: int,
    max_detections: int,
    content_types: tuple[str, ...],
    max_boxes: int = 0,
) -> dict[str, dict[str, Any]]:
    """The ``requestBody`` of POST /segment and /embed with this server's limits: exactly what
    server/bodies.py accepts (schemathesis checks both ways: tests/server/test_schemathesis.py).

    What a schema cannot say is said in words and keywords a fuzzer can be taught: ``image`` must
    be an image (``contentMediaType: image/*``; the accepted part types in its description)."""
    b64_max = 4 * -(-max_upload_bytes // 3)
    prompt = {
        "type": "string",
        "minLength": 1,
        "maxLength": max_prompt_chars,
        # No control characters, and something besides whitespace and what the tokenizer's
        # cleaning deletes (engines/tokenizer.py); HTML entities of whitespace are empty too.
        "pattern": f"^[^{REJECTED_CHARS}]*[^\\s{INVISIBLE_CHARS}][^{REJECTED_CHARS}]*$",
        "description": "A text prompt; the whitespace-only ones (no-break spaces, &nbsp; included) are refused.",
    }
    prompts: dict[str, Any] = {"type": "array", "items": prompt, "minItems": 1, "maxItems": max_prompts}
    # Exemplar entries exist only where the bundle can run them (max_boxes > 0). What no schema
    # can say (x1 > x0, y1 > y0, inside the image; negative boxes need text or a positive box;
    # as many labels as boxes) is in the description, and refused with 422 invalid_box.
    exemplar = {
        "type": "object", "additionalProperties": False, "required": ["boxes"],
        "properties": {
            "text": prompt,
            "boxes": {"type": "array", "minItems": 1, "maxItems": max_boxes,
                      "items": {"type": "array", "minItems": 4, "maxItems": 4,
                                "items": {"type": "number", "minimum": 0}}},
            "labels": {"type": "array", "minItems": 1, "maxItems": max_boxes,
                       "items": {"type": "integer", "enum": [0, 1]}},
        },
        "description": "Boxes are pixel [x0, y0, x1, y1] inside the image with x1 > x0 and y1 > y0; labels "
                       "(1 positive, 0 negative; default all 1), one per box. Negative boxes alone need "
                       "a text. The result's prompt is the text, or \"visual\" without one.",
    }  # fmt: skip
    json_prompts = dict(prompts, items={"anyOf": [prompt, exemplar]}) if max_boxes else prompts
    form_fields: dict[str, Any] = {"prompt": {"anyOf": [prompt, prompts]}}
    form_required: dict[str, Any] = {"required": ["prompt"]}
    if max_boxes:
        exemplar_text = {"type": "string", "contentMediaType": "application/json", "contentSchema": exemplar,
                         "description": "One exemplar entry as JSON text, e.g. {\"boxes\": [[10, 20, 90, 120]]}."}
        form_fields["exemplar"] = {"anyOf": [exemplar_text, {"type": "array", "items": exemplar_text,
                                                             "minItems": 1, "maxItems": max_prompts}]}
        form_required = {"anyOf": [{"required": ["prompt"]}, {"required": ["exemplar"]}]}
    image_id = {
        "type": "string",
        "pattern": ID_PATTERN,
        "description": "An image_id this API key received from POST /segment or /embed.",
    }
    # The options as SegmentOptionsModel (what the parser validates) declares them, plus this
    # server's cap; both body forms share them.
    declared = SegmentOptionsModel.model_json_schema()["properties"]
    options: dict[str, dict[str, Any]] = {
        "score_threshold": declared["score_threshold"],
        "mask_threshold": declared["mask_threshold"],
        "max_detections": {
            "type": "integer", "minimum": MIN_DETECTIONS, "maximum": max_detections,
            "description": "Detections per prompt (default: the cap; with P prompts at most SAM3_MAX_MASKS // P).",
        },
        "mask_format": {"type": "string", "enum": list(get_args(MaskFormat)), "default": "rle"},
    }  # fmt: skip
    image_media = "image/*"
    accepted = ", ".join(content_types)
    file_part = {"type": "string", "format": "binary", "contentMediaType": image_media, "maxLength": max_upload_bytes,
                 "description": f"The image file (JPEG, PNG, WebP, BMP, TIFF); its part's Content-Type one of {accepted}."}
    b64_image = {
        "type": "string", "format": "byte", "contentEncoding": "base64", "contentMediaType": image_media,
        "minLength": 4, "maxLength": b64_max,
        "description": "The image file, base64 (a data: URL prefix is accepted).",
    }  # fmt: skip
    # Exactly one of the two; in JSON a null one counts as absent.
    exactly_one_field = [{"required": ["image"]}, {"required": ["image_id"]}]
    exactly_one = [
        {"required": ["image"], "properties": {"image": {"type": "string"}}},
        {"required": ["image_id"], "properties": {"image_id": {"type": "string"}}},
    ]
    nullable = {"anyOf": [{"type": "null"}]}

    def or_null(schema: dict[str, Any]) -> dict[str, Any]:
        return {"anyOf": [schema, *nullable["anyOf"]]}

    return {
        "segment": {
            "multipart/form-data": {
                "schema": {
                    "type": "object", "additionalProperties": False,
                    # One prompt field is a string; repeated, they are the list.
                    "properties": {"image": file_part, "image_id": image_id, **form_fields, **options},
                    "allOf": [form_required, {"oneOf": exactly_one_field}],
                },
            },
            "application/json": {
                "schema": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "image": or_null(b64_image), "image_id": or_null(image_id), "prompts": json_prompts,
                        **options, "max_detections": or_null(options["max_detections"]),
                    },
                    "required": ["prompts"], "oneOf": exactly_one,
                },
            },
        },
        "embed": {
            "multipart/form-data": {
                "schema": {"type": "object", "additionalProperties": False,
                           "properties": {"image": file_part}, "required": ["image"]},
            },
            "application/json": {
                "schema": {"type": "object", "additionalProperties": False,
                           "properties": {"image": b64_image}, "required": ["image"]},
            },
        },
    }  # fmt: skip


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
    preprocess: float = Field(..., description="Pixel preparation and tokenizing.")
    image_encoder: float = Field(..., description="The image encoder (0 on a cache hit).")
    text_encoder: float = Field(..., description="The text encoder, for prompts not in the text cache.")
    geometry_encoder: float = Field(..., description="The exemplar boxes' prompt encoder (0 without boxes).")
    decoder: float = Field(..., description="The decoder, all prompts in one call per max batch.")
    postprocess: float = Field(..., description="Masks upsampled, thresholded and encoded.")
    total: float = Field(..., description="Request received to response ready.")


# The stages a response reports, in order (metrics label them the same way): the pipeline's
# STAGES between the server's own "queue" and "total" (a test holds them equal).
RESPONSE_STAGES: tuple[str, ...] = tuple(Timings.model_fields)


def response_timings(timings: dict[str, float]) -> dict[str, float]:
    """A request's milliseconds per stage as the response reports them (0 for a stage not run)."""
    return {stage: round(float(timings.get(stage, 0.0)), 3) for stage in RESPONSE_STAGES}


class ModelOut(_Response):
    name: str
    backend: str
    precision: str


class SegmentResponse(_Response):
    image_id: str = Field(..., description="The image's id for this API key: a keyed hash of its bytes (64 hex digits).")
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


class AdmissionOut(_Response):
    capacity: int = Field(..., description="SAM3_QUEUE_SIZE: requests in progress at most.")
    in_flight: int
    decode_slots: int = Field(..., description="SAM3_DECODE_CONCURRENCY: decoded images alive at most.")
    decoding: int
    decoding_peak: int = Field(..., description="Most decoded images alive at once since start.")


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
    max_masks: int
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
    admission: AdmissionOut
    worker: WorkerOut
    limits: LimitsOut
    stage_calls: dict[str, int]
    manifest: ManifestOut | None = None
