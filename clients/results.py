"""Dataclasses for the server's JSON documents, with masks decoded to numpy only on demand.

A response can hold hundreds of masks; most callers read scores and boxes, so
:class:`Mask` keeps the wire form and decodes at the first ``.array`` access: RLE with
pycocotools (bit-exact with what the server encoded), PNG and polygons with Pillow. All
three give the same array type, ``bool [H, W]``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from clients.errors import InvalidResponse


@dataclass(frozen=True)
class Mask:
    """One mask as sent (``format`` rle|png|polygon, ``size`` = (H, W)) plus its decoded array."""

    format: str
    size: tuple[int, int]  # (height, width)
    data: Mapping[str, Any] = field(repr=False)

    @cached_property
    def array(self) -> np.ndarray:
        """``bool [H, W]``; decoded at first access and then kept."""
        return decode_mask(self.data)

    @property
    def area(self) -> int:
        """Pixel count without a full decode for RLE (pycocotools computes it from the runs)."""
        if self.format == "rle":
            return int(mask_utils.area(_coco_rle(self.data)))
        return int(self.array.sum())


@dataclass(frozen=True)
class Detection:
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels
    mask: Mask | None = None


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    detections: tuple[Detection, ...]  # descending score, as the server sent them


@dataclass(frozen=True)
class SegmentResponse:
    """``POST /segment``: see server/README.md for the wire format."""

    image_id: str
    image_size: tuple[int, int]  # (width, height)
    cache_hit: bool
    results: tuple[PromptResult, ...]
    timings_ms: dict[str, float]
    model: dict[str, str]
    raw: dict[str, Any] = field(repr=False, compare=False)  # the JSON document as received

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SegmentResponse:
        try:
            size = doc["image_size"]
            return cls(
                image_id=str(doc["image_id"]),
                image_size=(int(size["width"]), int(size["height"])),
                cache_hit=bool(doc["cache_hit"]),
                results=tuple(
                    PromptResult(
                        prompt=str(r["prompt"]),
                        detections=tuple(_detection(d) for d in r["detections"]),
                    )
                    for r in doc["results"]
                ),
                timings_ms={str(k): float(v) for k, v in doc.get("timings_ms", {}).items()},
                model={str(k): str(v) for k, v in doc.get("model", {}).items()},
                raw=dict(doc),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidResponse(f"not a /segment response document ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class EmbedResponse:
    """``POST /embed``: ``cached`` is true when the server already held the embedding."""

    image_id: str
    image_size: tuple[int, int]  # (width, height)
    cached: bool

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> EmbedResponse:
        try:
            size = doc["image_size"]
            return cls(str(doc["image_id"]), (int(size["width"]), int(size["height"])), bool(doc["cached"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidResponse(f"not a /embed response document ({type(exc).__name__}: {exc})") from None


@dataclass(frozen=True)
class Health:
    """``GET /healthz`` plus ``GET /readyz``: up is not the same as ready (engines warm)."""

    status: str
    state: str
    ready: bool


def _detection(doc: Mapping[str, Any]) -> Detection:
    box = tuple(float(v) for v in doc["box"])
    if len(box) != 4:
        raise ValueError(f"box has {len(box)} values")
    mask_doc = doc.get("mask")
    mask = None
    if mask_doc is not None:
        height, width = (int(v) for v in mask_doc["size"])
        mask = Mask(format=str(mask_doc["format"]), size=(height, width), data=mask_doc)
    return Detection(score=float(doc["score"]), box=box, mask=mask)  # type: ignore[arg-type]


def _coco_rle(data: Mapping[str, Any]) -> dict[str, Any]:
    height, width = (int(v) for v in data["size"])
    return {"size": [height, width], "counts": str(data["counts"]).encode("ascii")}


def decode_mask(data: Mapping[str, Any]) -> np.ndarray:
    """Wire mask -> ``bool [H, W]`` for rle (COCO compressed counts), png (base64) and polygon."""
    fmt = data.get("format")
    height, width = (int(v) for v in data["size"])
    if fmt == "rle":
        return mask_utils.decode(_coco_rle(data)).astype(bool)
    if fmt == "png":
        from PIL import Image  # only PNG masks need Pillow

        with Image.open(io.BytesIO(base64.b64decode(data["data"]))) as img:
            array = np.asarray(img.convert("L")) > 0
        if array.shape != (height, width):
            raise InvalidResponse(f"PNG mask is {array.shape}, its size field says {(height, width)}")
        return array
    if fmt == "polygon":
        # The server's polygons are OpenCV contours through pixel centres; Pillow fills them
        # outline included, as cv2.fillPoly does (identical on random masks). pycocotools'
        # frPyObjects reads vertices as pixel corners and drops 1-pixel slivers (IoU ~0.75).
        from PIL import Image, ImageDraw

        canvas = Image.new("1", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in data["polygons"]:
            points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)]
            if len(points) >= 3:
                draw.polygon(points, fill=1, outline=1)
        return np.asarray(canvas, dtype=bool)
    raise InvalidResponse(f"unknown mask format {fmt!r}")
