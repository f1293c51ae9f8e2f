"""Request and response models: what /openapi.json documents and what the routes really return.

Routes return these response models (FastAPI validates them on the way out), so a response that
drifts from its documented shape is a 500 in the tests, not a surprise for a client. Request
bounds come from ``engines.options`` (one set of limits for the pipeline, the CLI and the API).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, Json, create_model, field_validator

from engines.options import MIN_DETECTIONS, THRESHOLD_MAX, THRESHOLD_MIN
from engines.tokenizer import INVISIBLE_CHARS, REJECTED_CHARS
from server.errors import InvalidSource
from server.image_ids import ID_PATTERN

MaskFormat = Literal["rle", "png", "polygon", "none"]


class _Response(BaseModel):
    # extra="forbid": a field the model does not declare is a bug in the server, not in the client.
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------
class LimitsOut(_Response):
    """The limits /info reports."""

    max_upload_bytes: int
    max_megapixels: float
    max_prompts: int
    max_prompt_chars: int
    max_detections: int
    max_masks: int
    request_timeout_s: float
    allowed_content_types: list[str]


class RequestLimits(LimitsOut):
    """What this server accepts: the numbers its request models, /openapi.json and /info carry.

    ``max_boxes`` is the loaded bundle's (0: text prompts only; None: not loaded yet, so the
    parser lets box prompts through to the pipeline, which owns the answer)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_boxes: int | None = None

    def info(self) -> dict[str, Any]:
        """The ``limits`` section of /info (the bundle's box limit is under ``capabilities``)."""
        return self.model_dump(include=set(LimitsOut.model_fields))


def _documented(**keywords: Any) -> Any:
    """JSON Schema keywords a field is documented with but the model does not check: their owner
    does (the tokenizer and ``Sam3Pipeline.check_prompts`` for prompts and boxes, with their own
    error codes; server/bodies.py for upload sizes), so each check is made once."""
    return Field(json_schema_extra=keywords)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SegmentOptionsModel(_Strict):
    """The options of POST /segment, in either body form."""

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


class ExemplarEntry(_Strict):
    """A prompt given by exemplar boxes, with or without text: "find everything like this box"."""

    text: str | None = Field(None, description="Optional text; without it the model is told \"visual\".")
    boxes: list[list[float]] = Field(..., description="Boxes as pixel [x0, y0, x1, y1] of the original image.")
    labels: list[int] | None = Field(None, description="1 positive, 0 negative, one per box (default: all 1).")


class SegmentJSON(SegmentOptionsModel):
    """JSON form of POST /segment: exactly one of ``image`` (base64) or ``image_id``."""

    image: str | None = Field(None, description="Base64 image bytes (a data: URL prefix is accepted).")
    image_id: str | None = Field(None, description="The image_id of an image already embedded (POST /embed or /segment).")
    prompts: list[str | ExemplarEntry] = Field(
        ..., description="Text prompts or exemplar entries; one result per prompt, in order.")


class EmbedJSON(_Strict):
    image: str = Field(..., description="Base64 image bytes.")


class EmbedForm(_Strict):
    image: bytes = Field(..., description="The image file.")


class StreamSourceIn(_Strict):
    """Exactly one of ``file``, ``url`` or ``device``; the operator's settings say which may open."""

    @staticmethod
    def _schema(schema: dict[str, Any]) -> None:
        # Absent or a string: null is no source (JSON Schema would otherwise let {"file": null}
        # satisfy the "required" of the oneOf).
        for prop in schema["properties"].values():
            prop.update(next(b for b in prop.pop("anyOf") if b.get("type") != "null"))
            prop.pop("default", None)
        schema["oneOf"] = [{"required": ["file"]}, {"required": ["url"]}, {"required": ["device"]}]

    model_config = ConfigDict(json_schema_extra=_schema)

    file: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[^\x00/\\][^\x00]*$",
                             description="A video file's name under SAM3_MEDIA_DIR.")
    # Credentials, a host name or IPv4 address (an IPv6 camera is listed and reached by name), a
    # port that exists: what urllib parses, so a URL the schema allows is never "malformed".
    url: str | None = Field(
        None, max_length=2048,
        pattern=r"^(rtsp|rtsps|http|https)://([^\s/?#@\[\]]*@)?[A-Za-z0-9.\-]+"
                r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?([/?#]\S*)?$",
        description="rtsp, rtsps, http or https, to a host in SAM3_STREAM_ALLOWED_HOSTS.")
    device: str | None = Field(None, min_length=1, max_length=255, description="A capture device in SAM3_STREAM_DEVICES.")

    def kind(self) -> tuple[str, str]:
        given = [(k, v) for k, v in (("file", self.file), ("url", self.url), ("device", self.device)) if v is not None]
        if len(given) != 1:
            raise InvalidSource("a source is exactly one of 'file', 'url' or 'device'")
        return given[0]


class StreamCreate(_Strict):
    """POST /streams: a source and prompts (text, exemplar boxes drawn on the first frame, or
    both); results come from GET /streams/{id}/events and /streams/{id}/mjpeg."""

    source: StreamSourceIn
    prompts: list[str | ExemplarEntry] = Field(..., description="One track set per prompt.")
    max_fps: float | None = Field(None, gt=0, description="Frames processed per second at most (SAM3_STREAM_MAX_FPS caps it).")
    score_threshold: float = Field(0.5, gt=0, le=THRESHOLD_MAX, description="A track starts at this score.")
    mask_format: MaskFormat = Field("none", description="Masks in the events (none: boxes and scores only).")


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one server: the models above with its limits documented in them.

    ``segment_json`` parses JSON bodies; the multipart parser (server/bodies.py) streams the parts
    itself and validates the options with ``segment_form``. :meth:`openapi` is their JSON Schema,
    so /openapi.json cannot say anything the parser does not do."""

    limits: RequestLimits
    segment_json: type[SegmentJSON]
    segment_form: type[SegmentOptionsModel]
    embed_json: type[EmbedJSON]
    embed_form: type[EmbedForm]
    stream_create: type[StreamCreate]

    def openapi(self) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        """The ``requestBody`` content of POST /segment, /embed and /streams, and the component schemas
        they refer to."""
        components: dict[str, Any] = {}

        def schema(model: type[BaseModel]) -> dict[str, Any]:
            out = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(out.pop("$defs", {}))
            return out

        bodies = {
            "segment": {"multipart/form-data": {"schema": schema(self.segment_form)},
                        "application/json": {"schema": schema(self.segment_json)}},
            "embed": {"multipart/form-data": {"schema": schema(self.embed_form)},
                      "application/json": {"schema": schema(self.embed_json)}},
            "streams": {"application/json": {"schema": schema(self.stream_create)}},
        }  # fmt: skip
        return bodies, components


def request_models(limits: RequestLimits) -> RequestModels:
    """The request models with ``limits`` in their schema (what schemathesis checks both ways:
    tests/server/test_schemathesis.py).

    What a schema cannot say is said in words and keywords a fuzzer can be taught: ``image`` must
    be an image (``contentMediaType: image/*``; the accepted part types in its description); a
    box lies inside the image with x1 > x0 and y1 > y0."""
    image_media = "image/*"
    accepted = ", ".join(limits.allowed_content_types)
    prompt_keywords = {
        "minLength": 1,
        "maxLength": limits.max_prompt_chars,
        # No control characters, and something besides whitespace and what the tokenizer's
        # cleaning deletes (engines/tokenizer.py); HTML entities of whitespace are empty too.
        "pattern": f"^[^{REJECTED_CHARS}]*[^\\s{INVISIBLE_CHARS}][^{REJECTED_CHARS}]*$",
        "description": "A text prompt; the whitespace-only ones (no-break spaces, &nbsp; included) are refused.",
    }
    TextPrompt = Annotated[str, _documented(**prompt_keywords)]
    prompt_count = {"minItems": 1, "maxItems": limits.max_prompts}
    with_boxes = limits.max_boxes != 0
    max_boxes = {"maxItems": limits.max_boxes} if limits.max_boxes else {}
    Box = Annotated[list[Annotated[float, _documented(minimum=0)]], _documented(minItems=4, maxItems=4)]

    class Exemplar(ExemplarEntry):
        __doc__ = ("Boxes are pixel [x0, y0, x1, y1] inside the image with x1 > x0 and y1 > y0; labels "
                   "(1 positive, 0 negative; default all 1), one per box. Negative boxes alone need "
                   "a text. The result's prompt is the text, or \"visual\" without one.")
        text: TextPrompt | None = None
        boxes: Annotated[list[Box], _documented(minItems=1, **max_boxes)]
        labels: Annotated[list[Annotated[int, _documented(enum=[0, 1])]],
                          _documented(minItems=1, **max_boxes)] | None = None

    Prompts = Annotated[list[TextPrompt | Exemplar] if with_boxes else list[TextPrompt],  # type: ignore[valid-type]
                        _documented(**prompt_count)]
    MaxDetections = Annotated[int, Field(ge=MIN_DETECTIONS), _documented(
        maximum=limits.max_detections,
        description="Detections per prompt (default: the cap; with P prompts at most SAM3_MAX_MASKS // P).")]
    ImageId = Annotated[str, _documented(pattern=ID_PATTERN,
                                         description="An image_id this API key received from POST /segment or /embed.")]
    b64_image = _documented(format="byte", contentEncoding="base64", contentMediaType=image_media, minLength=4,
                            maxLength=4 * -(-limits.max_upload_bytes // 3),
                            description="The image file, base64 (a data: URL prefix is accepted).")
    file_part = _documented(format="binary", contentMediaType=image_media, maxLength=limits.max_upload_bytes,
                            description="The image file (JPEG, PNG, WebP, BMP, TIFF); its part's Content-Type "
                                        f"one of {accepted}.")
    # Exactly one of the two; in JSON a null one counts as absent.
    one_image_json: dict[str, Any] = {"oneOf": [
        {"required": ["image"], "properties": {"image": {"type": "string"}}},
        {"required": ["image_id"], "properties": {"image_id": {"type": "string"}}},
    ]}
    one_image_form = {"oneOf": [{"required": ["image"]}, {"required": ["image_id"]}]}
    prompt_required: dict[str, Any] = (
        {"anyOf": [{"required": ["prompt"]}, {"required": ["exemplar"]}]} if with_boxes else {"required": ["prompt"]})

    class SegmentJSONBody(SegmentJSON):
        __doc__ = SegmentJSON.__doc__
        model_config = ConfigDict(title="SegmentJSON", json_schema_extra=one_image_json)
        image: Annotated[str, b64_image] | None = None
        image_id: ImageId | None = None
        prompts: Prompts  # type: ignore[valid-type]
        max_detections: MaxDetections | None = None

    def _form_schema(schema: dict[str, Any]) -> None:
        # A form field is there or not (no null in a form): optional, neither nullable nor null
        # by default.
        for name in form_fields:
            schema["properties"][name].pop("default", None)
        schema["allOf"] = [prompt_required, one_image_form]

    class _Form(SegmentOptionsModel):
        """multipart/form-data form of POST /segment: an ``image`` file part or an ``image_id``;
        ``prompt`` and ``exemplar`` fields, repeated, in the order their results come back."""

        model_config = ConfigDict(json_schema_extra=_form_schema)

    omitted = Field(None)
    form_fields: dict[str, Any] = {
        "image": (Annotated[bytes, file_part], omitted),
        "image_id": (ImageId, omitted),
        "prompt": (TextPrompt | Annotated[list[TextPrompt], _documented(**prompt_count)], omitted),
        "max_detections": (MaxDetections, omitted),
    }
    if with_boxes:  # one exemplar entry as JSON text per field
        text = Annotated[Json[Exemplar], _documented(
            description='One exemplar entry as JSON text, e.g. {"boxes": [[10, 20, 90, 120]]}.')]
        form_fields["exemplar"] = (text | Annotated[list[text], _documented(**prompt_count)], omitted)
    segment_form = create_model("SegmentForm", __base__=_Form, **form_fields)

    class EmbedJSONBody(EmbedJSON):
        model_config = ConfigDict(title="EmbedJSON")
        image: Annotated[str, b64_image]

    class EmbedFormBody(EmbedForm):
        model_config = ConfigDict(title="EmbedForm")
        image: Annotated[bytes, file_part]

    class StreamCreateBody(StreamCreate):
        __doc__ = StreamCreate.__doc__
        model_config = ConfigDict(title="StreamCreate")
        prompts: Prompts  # type: ignore[valid-type]

    return RequestModels(limits, SegmentJSONBody, segment_form, EmbedJSONBody, EmbedFormBody, StreamCreateBody)


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


# --------------------------------------------------------------------------------------------
# Streams (server/streams.py)
# --------------------------------------------------------------------------------------------
class StreamSourceOut(_Response):
    kind: Literal["file", "url", "device"]
    value: str = Field(..., description="The file name, the URL without credentials, or the device.")


class StreamStatsOut(_Response):
    frames_decoded: int
    frames_processed: int
    frames_dropped: int = Field(..., description="Decoded frames replaced by newer ones before processing.")
    frames_skipped: int = Field(..., description="Frames whose processing missed SAM3_REQUEST_TIMEOUT_S.")
    processed_fps: float
    latency_ms_p50: float | None = Field(..., description="Frame decoded -> event ready, last 100 frames.")
    tracks_alive: int
    last_frame: int
    source_fps: float | None
    subscribers: int = Field(..., description="Open event and overlay feeds.")


class StreamOut(_Response):
    id: str
    state: Literal["starting", "running", "ended", "failed", "stopped"]
    reason: str | None
    source: StreamSourceOut
    prompts: list[str]
    max_fps: float
    mask_format: MaskFormat
    created_at: float
    stats: StreamStatsOut


class StreamList(_Response):
    streams: list[StreamOut]
