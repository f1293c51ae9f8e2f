"""Reading request bodies (server/routes.py calls these): multipart or JSON in, a typed request out; every failure a typed error.

Multipart is parsed by hand (streamed, with part and field limits from the settings) rather than
by FastAPI's ``Form``/``File``, which would spool the whole upload before any limit applies.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from engines.errors import InvalidImage, InvalidPrompt
from server.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from server.schemas import EmbedJSON, SegmentJSON, SegmentOptionsModel
from server.settings import Settings


@dataclass(frozen=True)
class SegmentRequest:
    """POST /segment, whichever form it came in: exactly one of ``data`` and ``image_id``."""

    data: bytes | None
    image_id: str | None
    prompts: list[str]
    options: SegmentOptionsModel


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


async def read_segment_request(request: Request, settings: Settings) -> SegmentRequest:
    media = media_type(request)
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, settings)
        prompts = fields.pop("prompts", [])
        image_id = fields.pop("image_id", None)
        options = SegmentOptionsModel.model_validate(_form_options(fields))
    elif _is_json(media):
        parsed = SegmentJSON.model_validate_json(await _read_json(request))
        prompts, image_id = parsed.prompts, parsed.image_id
        data = _decode_base64(parsed.image, settings) if parsed.image is not None else None
        options = parsed  # a SegmentOptionsModel, validated with the rest of the body
    else:
        raise UnsupportedMediaType("POST /segment takes multipart/form-data or application/json")
    if data is not None and image_id is not None:
        raise BadRequest("send exactly one of 'image' or 'image_id'")
    if data is None and image_id is None:
        raise InvalidImage("an 'image' or an 'image_id' is required")
    return SegmentRequest(data=data, image_id=image_id, prompts=prompts, options=options)


async def read_embed_request(request: Request, settings: Settings) -> bytes:
    """The image bytes of POST /embed."""
    media = media_type(request)
    if media == "multipart/form-data":
        fields, data = await _read_multipart(request, settings)
        if fields:
            raise BadRequest(f"unexpected fields {sorted(fields)}; POST /embed takes only 'image'")
    elif _is_json(media):
        data = _decode_base64(EmbedJSON.model_validate_json(await _read_json(request)).image, settings)
    else:
        raise UnsupportedMediaType("POST /embed takes multipart/form-data or application/json")
    if data is None:
        raise InvalidImage("an 'image' file is required")
    return data
