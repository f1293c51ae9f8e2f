"""Request bodies and error bodies of the SAM3 server, shared by the sync client and the
asyncio load generator (benchmarks/http.py), so both speak exactly the same protocol.
"""

from __future__ import annotations

import email.utils
import io
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import httpx
import numpy as np

from clients.errors import ApiError, InvalidResponse, RateLimited

ImageInput = str | Path | bytes | bytearray | np.ndarray | Any  # Any: a PIL image

# Signature -> declared content type. The server sniffs octet-stream too; naming the type
# lets it refuse a non-image with 415 before decoding.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"BM", "image/bmp"),
    (b"II*\x00", "image/tiff"),
    (b"MM\x00*", "image/tiff"),
)

OPTION_NAMES = ("score_threshold", "mask_threshold", "max_detections", "mask_format")


def image_payload(image: ImageInput) -> tuple[str, bytes, str]:
    """(file name, bytes, content type) for a path, raw bytes, an RGB uint8 array or a PIL image.

    Arrays and PIL images are sent as PNG (lossless: the server's image_id is a keyed hash of
    the bytes, so the same array always maps to the same cached embedding).
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        data = path.read_bytes()
        return path.name, data, sniff_content_type(data)
    if isinstance(image, (bytes, bytearray)):
        data = bytes(image)
        return "image", data, sniff_content_type(data)
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise TypeError(f"an image array must be uint8 [H, W] or [H, W, C], got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot send {type(image).__name__} as an image (path, bytes, numpy array or PIL image)")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "image.png", buf.getvalue(), "image/png"


def sniff_content_type(data: bytes) -> str:
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


@dataclass(frozen=True)
class Exemplar:
    """A prompt given by boxes ("find everything like this"), with or without text.

    ``boxes`` are pixel (x0, y0, x1, y1) of the original image; ``negative`` ones mean "not like
    this" and need a text or a positive box beside them.
    """

    boxes: Sequence[Sequence[float]] = ()
    negative: Sequence[Sequence[float]] = ()
    text: str | None = None

    def to_json(self) -> dict[str, Any]:
        boxes = [[float(v) for v in box] for box in (*self.boxes, *self.negative)]
        entry: dict[str, Any] = {"boxes": boxes, "labels": [1] * len(self.boxes) + [0] * len(self.negative)}
        if self.text is not None:
            entry["text"] = self.text
        return entry


Prompt = Union[str, Exemplar]


def prompt_json(prompt: Prompt) -> Any:
    return prompt.to_json() if isinstance(prompt, Exemplar) else prompt


def form_fields(prompts: Sequence[str], options: Mapping[str, Any]) -> dict[str, Any]:
    """Multipart text fields: ``prompt`` repeated, options as strings (None = server default)."""
    fields: dict[str, Any] = {"prompt": list(prompts)}
    for name, value in _checked_options(options).items():
        fields[name] = str(value)
    return fields


def json_body(prompts: Sequence[Prompt], options: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    return {**extra, "prompts": [prompt_json(p) for p in prompts], **_checked_options(options)}


def _checked_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unknown segment option(s) {unknown}; known: {', '.join(OPTION_NAMES)}")
    return {k: v for k, v in options.items() if v is not None}


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None if absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def raise_for_error(response: httpx.Response) -> None:
    """Turn a non-2xx answer into :class:`ApiError` with the server's code and message."""
    if response.is_success:
        return
    code, message = f"http_{response.status_code}", response.reason_phrase or "error"
    try:
        body = response.json()
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            code = str(error.get("code") or code)
            message = str(error.get("message") or message)
    except ValueError:
        text = response.text.strip().splitlines()
        if text:
            message = text[0][:200]
    cls = RateLimited if response.status_code == 429 else ApiError
    raise cls(response.status_code, code, message, retry_after_s=retry_after_seconds(response))


def json_document(response: httpx.Response) -> dict[str, Any]:
    raise_for_error(response)
    try:
        doc = response.json()
    except ValueError:
        raise InvalidResponse(f"{response.request.url} answered {response.status_code} with non-JSON content") from None
    if not isinstance(doc, dict):
        raise InvalidResponse(f"{response.request.url} answered a JSON {type(doc).__name__}, not an object")
    return doc
