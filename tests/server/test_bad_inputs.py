"""Bad input -> the documented 4xx with a JSON error body, and the server keeps answering."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from typing import Any, Callable

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.conftest import image_bytes

GOOD = image_bytes(seed=11)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims a huge size (a decompression bomb): rejected from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _png16() -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.arange(120 * 160).reshape(120, 160) * 3).astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _exif_rotated() -> bytes:
    img = Image.fromarray((np.random.default_rng(5).random((120, 160, 3)) * 255).astype(np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display: 160x120 stored -> 120x160 shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


def multipart(data: bytes | None, prompts: list[str] = ["cat"], ctype: str = "image/jpeg", **fields: Any):
    def send(c: httpx.Client) -> httpx.Response:
        files = {"image": ("img", data, ctype)} if data is not None else None
        form: dict[str, Any] = {"prompt": prompts, **{k: str(v) for k, v in fields.items()}}
        if files is None:
            # httpx sends urlencoded without files; force multipart with a dummy text part
            return c.post("/segment", files={"prompt": (None, prompts[0] if prompts else "")}, data={k: v for k, v in form.items() if k != "prompt"})
        return c.post("/segment", files=files, data=form)
    return send


def as_json(body: Any):
    return lambda c: c.post("/segment", json=body)


def raw(content: bytes, ctype: str | None, path: str = "/segment"):
    headers = {"content-type": ctype} if ctype else {}
    return lambda c: c.post(path, content=content, headers=headers)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MAX_UPLOAD = 2 * 1024 * 1024  # SERVER_ENV in conftest
CMYK = image_bytes(seed=12, mode="CMYK")

# (id, request, expected status, expected error code or None for success)
CASES: list[tuple[str, Callable[[httpx.Client], httpx.Response], int, str | None]] = [
    ("corrupt-jpeg", multipart(b"\xff\xd8\xff\xe0" + b"\x00garbage" * 50), 422, "invalid_image"),
    ("truncated-jpeg", multipart(GOOD[: len(GOOD) // 3]), 422, "invalid_image"),
    ("truncated-png", multipart(image_bytes(seed=13, fmt="PNG")[:200], ctype="image/png"), 422, "invalid_image"),
    ("corrupt-png-crc", multipart(_png_header_only(100, 100)[:30] + b"\x00" * 40, ctype="image/png"), 422, "invalid_image"),
    ("non-image-bytes", multipart(b"%PDF-1.4 not an image at all", ctype="application/octet-stream"), 422, "invalid_image"),
    ("empty-image", multipart(b""), 422, "invalid_image"),
    ("empty-body-no-type", raw(b"", None), 415, "unsupported_media_type"),
    ("empty-json-body", raw(b"", "application/json"), 400, "bad_request"),
    ("wrong-request-content-type", raw(GOOD, "image/jpeg"), 415, "unsupported_media_type"),
    ("wrong-part-content-type", multipart(GOOD, ctype="text/plain"), 415, "unsupported_media_type"),
    ("multipart-without-boundary", raw(b"--x\r\n", "multipart/form-data"), 400, "bad_request"),
    ("decompression-bomb-header", multipart(_png_header_only(30000, 30000), ctype="image/png"), 413, "image_too_large"),
    ("huge-upload", multipart(b"\xff\xd8" + b"\x00" * (MAX_UPLOAD + 10)), 413, "payload_too_large"),
    ("huge-base64", as_json({"image": "A" * (MAX_UPLOAD * 2), "prompts": ["cat"]}), 413, "payload_too_large"),
    ("bad-base64", as_json({"image": "not*base64!", "prompts": ["cat"]}), 422, "invalid_image"),
    ("base64-of-garbage", as_json({"image": b64(b"hello world"), "prompts": ["cat"]}), 422, "invalid_image"),
    ("unknown-image-id", as_json({"image_id": "0" * 64, "prompts": ["cat"]}), 404, "image_not_cached"),
    ("no-image-no-id", as_json({"prompts": ["cat"]}), 422, "validation_error"),
    ("image-and-id", as_json({"image": b64(GOOD), "image_id": "0" * 64, "prompts": ["cat"]}), 422, "validation_error"),
    ("empty-prompt-list", as_json({"image": b64(GOOD), "prompts": []}), 422, "invalid_prompt"),
    ("blank-prompt", multipart(GOOD, prompts=["   "]), 422, "invalid_prompt"),
    ("too-many-prompts", multipart(GOOD, prompts=[f"p{i}" for i in range(9)]), 422, "too_many_prompts"),
    ("too-long-prompt", as_json({"image": b64(GOOD), "prompts": ["x" * 65]}), 422, "prompt_too_long"),
    ("non-utf8-json", raw(b'{"image_id": "\xff\xfe", "prompts": ["\xc3\x28"]}', "application/json"), 400, "bad_request"),
    ("non-utf8-multipart-prompt", raw(
        b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\ncat\xff\xfe\r\n--B--\r\n",
        "multipart/form-data; boundary=B"), 422, "invalid_prompt"),
    ("prompts-not-a-list", as_json({"image": b64(GOOD), "prompts": "cat"}), 422, "validation_error"),
    ("prompt-not-a-string", as_json({"image": b64(GOOD), "prompts": [1, 2]}), 422, "validation_error"),
    ("threshold-a-string", as_json({"image": b64(GOOD), "prompts": ["cat"], "score_threshold": "high"}), 422, "validation_error"),
    ("negative-score-threshold", as_json({"image": b64(GOOD), "prompts": ["cat"], "score_threshold": -0.1}), 422, "validation_error"),
    ("negative-mask-threshold-form", multipart(GOOD, mask_threshold=-1), 422, "validation_error"),
    ("zero-max-detections", multipart(GOOD, max_detections=0), 422, "validation_error"),
    ("max-detections-over-cap", as_json({"image": b64(GOOD), "prompts": ["cat"], "max_detections": 10**6}), 422, "invalid_option"),
    ("bad-mask-format", as_json({"image": b64(GOOD), "prompts": ["cat"], "mask_format": "jpeg"}), 422, "validation_error"),
    ("unknown-json-field", as_json({"image": b64(GOOD), "prompt": ["cat"]}), 422, "validation_error"),
    ("json-array-body", as_json(["cat"]), 422, "validation_error"),
    ("malformed-json", raw(b'{"prompts": [', "application/json"), 400, "bad_request"),
    ("embed-no-image", raw(b"{}", "application/json", "/embed"), 422, "validation_error"),
    ("get-on-segment", lambda c: c.get("/segment"), 405, "method_not_allowed"),
    ("unknown-route", lambda c: c.get("/nope"), 404, "not_found"),
    # Valid but unusual images are accepted, not errors:
    ("png-16-bit", multipart(_png16(), ctype="image/png", score_threshold=0), 200, None),
    ("cmyk-jpeg", multipart(CMYK, score_threshold=0), 200, None),
    ("exif-rotated-jpeg", multipart(_exif_rotated(), score_threshold=0), 200, None),
]


@pytest.mark.parametrize("name,send,status,code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(client: httpx.Client, name: str, send, status: int, code: str | None) -> None:
    response = send(client)
    assert response.status_code == status, response.text[:500]
    if code is not None:
        body = response.json()
        assert body["error"]["code"] == code, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if name == "exif-rotated-jpeg":
        assert response.json()["image_size"] == {"width": 120, "height": 160}  # orientation applied
    if name == "cmyk-jpeg":
        assert response.json()["image_size"] == {"width": 160, "height": 120}
    assert client.get("/healthz").status_code == 200


def test_suite_is_large_enough() -> None:
    assert sum(1 for c in CASES if c[2] >= 400) >= 25


def test_server_still_serves_after_bad_inputs(client: httpx.Client) -> None:
    for _, send, _, _ in CASES[:10]:
        send(client)
    ok = client.post("/segment", files={"image": ("a.jpg", GOOD, "image/jpeg")}, data={"prompt": "cat"})
    assert ok.status_code == 200 and client.get("/readyz").status_code == 200
