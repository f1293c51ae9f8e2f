"""One status per kind of error, whether the request is multipart or JSON; prompts judged as the
tokenizer will read them (whitespace and no-break spaces, HTML entities, control characters)."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.server.conftest import image_bytes

GOOD = image_bytes(seed=41)
ID = "ab" * 32


def _blank_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def multipart(image: bytes | None, prompts: list[str], image_id: str | None = None, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"prompt": prompts, **{k: str(v) for k, v in fields.items()}}
    if image_id is not None:
        data["image_id"] = image_id
    files = {"image": ("a.jpg", image, "image/jpeg")} if image is not None else {"prompt": (None, prompts[0])}
    if image is None:
        data["prompt"] = prompts[1:]
    return {"files": files, "data": data}


def as_json(image: bytes | None, prompts: list[str], image_id: str | None = None, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"prompts": prompts, **fields}
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    if image_id is not None:
        body["image_id"] = image_id
    return {"json": body}


# kind -> (arguments of both forms, status, code); tests/server/conftest.py SERVER_ENV: 8 prompts
# of at most 64 characters, 4 MP, 2 MiB uploads.
KINDS: dict[str, tuple[dict[str, Any], int, str]] = {
    "too many prompts": ({"image": GOOD, "prompts": [f"p{i}" for i in range(1000)]}, 422, "too_many_prompts"),
    "one too many prompts": ({"image": GOOD, "prompts": [f"p{i}" for i in range(9)]}, 422, "too_many_prompts"),
    "prompt too long": ({"image": GOOD, "prompts": ["x" * 65]}, 422, "prompt_too_long"),
    "whitespace prompt": ({"image": GOOD, "prompts": ["  \t "]}, 422, "invalid_prompt"),
    "no-break spaces": ({"image": GOOD, "prompts": ["\u00a0 \u2003\u00a0"]}, 422, "invalid_prompt"),
    "entity spaces": ({"image": GOOD, "prompts": ["&nbsp;&#32;"]}, 422, "invalid_prompt"),
    "byte order mark": ({"image": GOOD, "prompts": ["\ufeff "]}, 422, "invalid_prompt"),
    "control character": ({"image": GOOD, "prompts": ["a\x1b[1mcat"]}, 422, "invalid_prompt"),
    "neither image nor id": ({"image": None, "prompts": ["cat", "dog"]}, 422, "validation_error"),
    "both image and id": ({"image": GOOD, "prompts": ["cat"], "image_id": ID}, 422, "validation_error"),
    "malformed id": ({"image": None, "prompts": ["cat", "dog"], "image_id": "../etc"}, 422, "validation_error"),
    "unknown option": ({"image": GOOD, "prompts": ["cat"], "colour": "red"}, 422, "validation_error"),
    "threshold out of range": ({"image": GOOD, "prompts": ["cat"], "score_threshold": 1.5}, 422, "validation_error"),
    "threshold not a number": ({"image": GOOD, "prompts": ["cat"], "mask_threshold": "high"}, 422, "validation_error"),
    "zero detections": ({"image": GOOD, "prompts": ["cat"], "max_detections": 0}, 422, "validation_error"),
    "detections over the cap": ({"image": GOOD, "prompts": ["cat"], "max_detections": 101}, 422, "invalid_option"),
    "unknown mask format": ({"image": GOOD, "prompts": ["cat"], "mask_format": "jpeg"}, 422, "validation_error"),
    "not an image": ({"image": b"%PDF-1.4 nope", "prompts": ["cat"]}, 422, "invalid_image"),
    "empty image": ({"image": b"", "prompts": ["cat"]}, 422, "invalid_image"),
    "unknown id": ({"image": None, "prompts": ["cat", "dog"], "image_id": ID}, 404, "image_not_cached"),
    "image over the megapixels": ({"image": _blank_png(2400, 1800), "prompts": ["cat"]}, 413, "image_too_large"),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_one_status_per_error_kind(client: httpx.Client, kind: str) -> None:
    args, status, code = KINDS[kind]
    answers = {}
    for form in (multipart, as_json):
        response = client.post("/segment", **form(**args))
        answers[form.__name__] = (response.status_code, response.json()["error"]["code"])
    assert answers == {"multipart": (status, code), "as_json": (status, code)}, answers


def test_prompts_keep_their_text_and_blank_ones_are_named(client: httpx.Client) -> None:
    ok = client.post("/segment", json={"image": base64.b64encode(GOOD).decode(), "prompts": ["\u00a0a cat\u00a0", "{}"]})
    assert ok.status_code == 200 and [r["prompt"] for r in ok.json()["results"]] == ["\u00a0a cat\u00a0", "{}"]
    bad = client.post("/segment", json={"image": base64.b64encode(GOOD).decode(), "prompts": ["cat", "&nbsp;"]})
    assert bad.status_code == 422 and "prompt 1 ('&nbsp;')" in bad.json()["error"]["message"]


def test_malformed_bodies_are_400_in_both_forms(client: httpx.Client) -> None:
    for content, ctype in ((b'{"prompts": [', "application/json"), (b'{"prompts": ["\xff"]}', "application/json"),
                           (b"--x\r\n", "multipart/form-data")):
        response = client.post("/segment", content=content, headers={"content-type": ctype})
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request", content


def test_detections_per_request_are_bounded(client: httpx.Client) -> None:
    """SAM3_MAX_MASKS bounds prompts x detections: 8 prompts share 256 masks here (the tiny
    model has 10 queries, so each keeps them all); /info shows the bound."""
    assert client.get("/info").json()["limits"]["max_masks"] == 256
    body = client.post("/segment", json={"image": base64.b64encode(GOOD).decode(), "prompts": [f"p{i}" for i in range(8)],
                                         "score_threshold": 0.0, "mask_format": "none"}).json()
    assert all(len(r["detections"]) == 10 for r in body["results"])
