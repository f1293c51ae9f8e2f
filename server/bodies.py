"""Reading request bodies (server/routes.py calls these): multipart or JSON in, a typed request out; every failure a typed error.

Multipart is parsed by hand (streamed, with part and field limits from the request limits) rather than
by FastAPI's ``Form``/``File``, which would spool the whole upload before any limit applies.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from pydantic import ValidationError

from engines.errors import InvalidBox, InvalidImage, InvalidPrompt, TooManyPrompts
from engines.types import Prompt
from server.cpu import CpuWork
from server.errors import BadRequest, InvalidField, PayloadTooLarge, UnsupportedMediaType
from server.image_ids import ID_PATTERN
from server.schemas import ExemplarEntry, RequestLimits, RequestModels, SegmentJSON, SegmentOptionsModel


@dataclass(frozen=True)
class SegmentRequest:
    """POST /segment, whichever form it came in: exactly one of ``data`` and ``image_id``."""

    data: bytes | None
    image_id: str | None
    prompts: list[str | Prompt]  # text, or exemplar boxes with or without text
    options: SegmentOptionsModel


def exemplar_prompt(entry: ExemplarEntry, index: int) -> Prompt:
    """An exemplar entry as the runtime takes it; the runtime checks the boxes against the image."""
    return Prompt.from_wire(entry.boxes, entry.labels, entry.text, index)


def _form_exemplar(text: str, index: int) -> Prompt:
    try:
        entry = ExemplarEntry.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid"}
        raise InvalidBox(f"prompt {index}: 'exemplar' is a JSON object like "
                         f'{{"boxes": [[x0, y0, x1, y1]], "labels": [1]}}: {first["msg"]}') from None
    return exemplar_prompt(entry, index)


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


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


# Every text field but the prompts is given at most once: beyond this many fields, the request
# has too many prompts (the only field that repeats).
_OTHER_FIELDS = 8


async def _read_multipart(request: Request, limits: RequestLimits) -> tuple[dict[str, Any], bytes | None]:
    parser = _StrictMultiPartParser(
        request.headers,
        request.stream(),
        max_files=1,
        max_fields=limits.max_prompts + _OTHER_FIELDS,
        max_part_size=max(1024 * 1024, limits.max_prompt_chars * 8),
    )
    try:
        form = await parser.parse()
    except _NonUtf8Field as exc:
        raise InvalidPrompt(exc.message) from None
    except MultiPartException as exc:
        if exc.message.startswith("Too many fields"):  # one status for too many prompts, JSON or form
            raise TooManyPrompts(f"more than {limits.max_prompts} prompts per request") from None
        if exc.message.startswith("Too many files"):
            raise InvalidField("only one file part, 'image', is accepted") from None
        raise BadRequest(f"malformed multipart body: {exc.message}") from None
    try:
        fields: dict[str, Any] = {}
        data: bytes | None = None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "image":
                    raise InvalidField(f"unexpected file field {key!r}; send the image as 'image'")
                declared = (value.content_type or "application/octet-stream").split(";")[0].strip().lower()
                if declared not in limits.allowed_content_types:
                    raise UnsupportedMediaType(
                        f"image content type {declared!r} is not accepted "
                        f"(accepted: {', '.join(limits.allowed_content_types)})"
                    )
                data = await value.read(limits.max_upload_bytes + 1)  # a bound; _image_bytes checks
            elif key == "prompt":
                fields.setdefault("prompts", []).append(value)
            elif key == "exemplar":  # in order with the text prompts: one result per field
                prompts = fields.setdefault("prompts", [])
                prompts.append(_form_exemplar(value, len(prompts)))
            elif key == "image":
                raise InvalidField("'image' must be a file part (curl -F image=@photo.jpg)")
            else:
                fields[key] = value  # given twice: the last one, as a JSON object's duplicate keys
        return fields, data
    finally:
        await form.close()


def _decode_base64(text: str, limits: RequestLimits) -> bytes:
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    text = "".join(text.split())
    if len(text) * 3 // 4 > limits.max_upload_bytes + 3:  # refused before decoding; _image_bytes checks
        raise PayloadTooLarge(f"image of ~{len(text) * 3 // 4} bytes; at most {limits.max_upload_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImage("'image' is not valid base64") from None


async def _read_json(request: Request) -> bytearray:
    """The body, streamed into one buffer the caller owns (``request.body()`` would keep a second
    reference on the request for its whole life)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
    if not body:
        raise BadRequest("empty request body")
    return body


def _parse_segment_json(raw: bytearray, models: RequestModels) -> tuple[SegmentJSON, bytes | None]:
    parsed = models.segment_json.model_validate_json(raw)
    del raw[:]  # the base64 text is in ``parsed`` now: do not hold it twice
    image, parsed.image = parsed.image, None
    return parsed, None if image is None else _decode_base64(image, models.limits)


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


def _image_bytes(data: bytes, limits: RequestLimits) -> bytes:
    """The one check of an upload's size; the readers above only stop reading past the limit."""
    if not data:
        raise InvalidImage("the image is empty (0 bytes)")
    if len(data) > limits.max_upload_bytes:
        raise PayloadTooLarge(f"image of {len(data)} bytes; at most {limits.max_upload_bytes} bytes")
    return data


async def read_segment_request(request: Request, models: RequestModels, cpu: CpuWork) -> SegmentRequest:
    media = media_type(request)
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, models.limits)
        prompts = fields.pop("prompts", [])
        # The parts are streamed above; the rest of the form is the model's (options, image_id).
        options = models.segment_form.model_validate(_form_options(fields))
        image_id = fields.get("image_id")
    elif _is_json(media):
        # Parsing and base64 decoding of a 27 MB body take tens of milliseconds: not on the loop.
        raw = await _read_json(request)
        # A JSON body holds ~2.4 times its image while parsed: it takes a decode slot.
        parsed, data = await cpu.run_in_slot(_parse_segment_json, raw, models)
        prompts = [p if isinstance(p, str) else exemplar_prompt(p, i) for i, p in enumerate(parsed.prompts)]
        image_id = parsed.image_id
        options = parsed  # a SegmentOptionsModel, validated with the rest of the body
    else:
        raise UnsupportedMediaType("POST /segment takes multipart/form-data or application/json")
    if (data is None) == (image_id is None):
        raise InvalidField("send exactly one of 'image' (the bytes) or 'image_id'")
    if image_id is not None and not re.fullmatch(ID_PATTERN, image_id):
        raise InvalidField("'image_id' is 64 lowercase hex digits, as the server returned it")
    return SegmentRequest(data=None if data is None else _image_bytes(data, models.limits), image_id=image_id, prompts=prompts,
                          options=options)


async def read_embed_request(request: Request, models: RequestModels, cpu: CpuWork) -> bytes:
    """The image bytes of POST /embed."""
    media = media_type(request)
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, models.limits)
        if fields:
            raise InvalidField(f"unexpected fields {sorted(fields)}; POST /embed takes only 'image'")
    elif _is_json(media):
        raw = await _read_json(request)
        data = await cpu.run_in_slot(lambda: _decode_base64(models.embed_json.model_validate_json(raw).image, models.limits))
    else:
        raise UnsupportedMediaType("POST /embed takes multipart/form-data or application/json")
    if data is None:
        raise InvalidImage("an 'image' file is required")
    return _image_bytes(data, models.limits)
