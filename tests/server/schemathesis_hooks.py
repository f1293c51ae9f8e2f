"""What /openapi.json says in words and schemathesis must be taught: an ``image`` is an image,
and an exemplar box lies inside it.

The request schemas declare the image as ``contentMediaType: image/*``; no JSON Schema can say
"decodes as an image", so positive examples come from these strategies: small real PNG/JPEG
files, raw for the multipart ``format: binary`` part and base64 for the JSON ``format: byte``
field. Used by
tests/server/test_schemathesis.py and, for a long campaign, by the CLI:

    SCHEMATHESIS_HOOKS=tests.server.schemathesis_hooks .venv/bin/schemathesis run \\
        http://127.0.0.1:8000/openapi.json --checks all --max-time 300
"""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import jsonschema
import numpy as np
import schemathesis
import schemathesis.specs.openapi.checks as _checks
from hypothesis import strategies as st
from PIL import Image
from schemathesis.transport.serialization import Binary


def _image(fmt: str, seed: int, width: int, height: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def images(fmt: str) -> st.SearchStrategy[bytes]:
    return st.builds(
        _image, st.just(fmt), st.integers(0, 2**16), st.integers(1, 96), st.integers(1, 96)
    )


ANY_IMAGE = st.one_of(images("PNG"), images("JPEG"))
schemathesis.openapi.format("binary", ANY_IMAGE)
schemathesis.openapi.format("byte", ANY_IMAGE.map(lambda b: base64.b64encode(b).decode()))


# --- two workarounds for schemathesis 4.32.5 with multipart bodies that hold a file part -------
# Both only stop schemathesis from misjudging requests; neither changes what is sent or checked.


def _as_text(body: dict[str, Any]) -> dict[str, Any]:
    # A file part is a string of bytes to the schema (``format: binary``); jsonschema_rs refuses
    # schemathesis' Binary type outright ("Unsupported type: 'Binary'").
    return {k: ("" if isinstance(v, Binary) else v) for k, v in body.items()}


@schemathesis.hook
def filter_case(context: Any, case: Any) -> bool:
    """Drop "positive" cases whose body breaks the schema: the coverage phase builds multipart
    bodies holding both ``image`` and ``image_id`` against the schema's ``oneOf``; and those whose
    exemplar boxes break what the schema says only in words (inside the image, x1 > x0, y1 > y0,
    one label per box, negative boxes beside a text or a positive box)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return True
    body = case.operation.get_body_for_media_type(case.media_type) if case.media_type else None
    if body is None:
        return True
    if not jsonschema.Draft202012Validator(body.optimized_schema).is_valid(_as_text(case.body)):
        return False
    return _exemplars_usable(case.body)


def _exemplars_usable(body: dict[str, Any]) -> bool:
    entries = [p for p in body.get("prompts", []) if isinstance(p, dict)] if isinstance(body.get("prompts"), list) else []
    forms = body.get("exemplar", [])
    for text in [forms] if isinstance(forms, str) else forms:
        try:
            entries.append(json.loads(text))
        except ValueError:
            return False
    if not entries:
        return True
    size = _image_size(body.get("image"))
    if size is None:  # an image_id: its size is not known here
        return False
    width, height = size
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("boxes"), list):
            return False
        labels = entry.get("labels") or [1] * len(entry["boxes"])
        if len(labels) != len(entry["boxes"]) or (entry.get("text") is None and 1 not in labels):
            return False
        for box in entry["boxes"]:
            if len(box) != 4:
                return False
            x0, y0, x1, y1 = box
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                return False
    return True


def _image_size(image: Any) -> tuple[int, int] | None:
    if isinstance(image, Binary):
        data = image.data
    elif isinstance(image, str):
        data = base64.b64decode(image)
    else:
        return None
    return Image.open(io.BytesIO(data)).size


_as_sent = _checks._form_body_is_valid_as_sent


def _as_sent_with_file_parts(response: Any, case: Any, media_type: str) -> bool:
    """schemathesis re-reads a negative form body as the server reads it (a mutated ``true`` is
    the prompt text "true"), but gives up on any body with a file part (the Binary above)."""
    body = case.body
    if not isinstance(body, dict) or not any(isinstance(v, Binary) for v in body.values()):
        return bool(_as_sent(response, case, media_type))
    case.body = _as_text(body)
    try:
        return bool(_as_sent(response, case, media_type))
    finally:
        case.body = body


_checks._form_body_is_valid_as_sent = _as_sent_with_file_parts
