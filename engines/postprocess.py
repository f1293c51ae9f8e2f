"""Decoder outputs -> detections, and detections -> the JSON document the CLI and server return.

Semantics are transformers' ``Sam3ImageProcessor.post_process_instance_segmentation``
(``image_processing_sam3.py``): score = sigmoid(logit) * sigmoid(presence); keep score >
threshold; boxes (normalised xyxy) times (W, H, W, H), not clipped; masks = sigmoid(mask logits)
resized bilinearly (align_corners=False, no antialias) to the original size, then > mask_threshold.
transformers neither sorts nor caps the count; we sort by descending score and apply
``max_detections`` *before* any mask is drawn, so at most that many masks are ever upsampled.
(Meta's own processor differs slightly: it resizes the logits and then applies sigmoid > 0.5.)

A detection keeps its kept query's low-resolution probabilities (:class:`engines.masks.LowResMask`);
the full-resolution mask is drawn one at a time when it is read or encoded (engines/masks.py:
the same half-pixel mapping and edge clamping as ``F.interpolate(mode="bilinear",
align_corners=False)`` and OpenCV's ``INTER_LINEAR``; tests compare the masks).
"""

from __future__ import annotations

import base64
from typing import Any, Sequence

import cv2
import numpy as np
from pycocotools import mask as mask_utils

from engines.errors import InvalidOption
from engines.masks import MASK_FORMATS, DenseMask, LowResMask, MaskSource, check_format
from engines.options import SegmentOptions
from engines.types import Detection, ImageSize, PromptResult

__all__ = ["MASK_FORMATS", "decode_mask", "encode_mask", "postprocess", "result_document", "upsample_masks"]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative logits: 1/inf = 0
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def postprocess(
    pred_masks: np.ndarray,
    pred_boxes: np.ndarray,
    pred_logits: np.ndarray,
    presence_logit: np.ndarray | float,
    original_size: tuple[int, int],
    options: SegmentOptions | None = None,
) -> tuple[Detection, ...]:
    """Detections of one prompt: masks [Q, h, w] logits, boxes [Q, 4], logits [Q], presence [1].

    ``original_size`` is numpy's (height, width) of the original image (``ImageSize.shape``).
    """
    options = options if options is not None else SegmentOptions()
    score_threshold, mask_threshold = float(options.score_threshold), float(options.mask_threshold)
    max_detections, with_masks = options.max_detections, options.with_masks
    height, width = (int(v) for v in original_size)
    logits = np.asarray(pred_logits, dtype=np.float32).reshape(-1)
    boxes = np.asarray(pred_boxes, dtype=np.float32).reshape(-1, 4)
    presence = np.asarray(presence_logit, dtype=np.float32).reshape(-1)
    if presence.size != 1 or boxes.shape[0] != logits.shape[0]:
        raise ValueError(f"inconsistent decoder outputs: logits {logits.shape}, boxes {boxes.shape}, presence {presence.shape}")

    scores = _sigmoid(logits) * _sigmoid(presence)[0]
    keep = np.flatnonzero(scores > score_threshold)
    keep = keep[np.argsort(-scores[keep], kind="stable")]  # descending score, ties by query index
    if max_detections is not None:
        keep = keep[: int(max_detections)]
    scale = np.asarray([width, height, width, height], dtype=np.float32)

    # Only the kept queries' low-resolution probabilities are kept (a copy: the decoder's output
    # batch can be freed); full-resolution masks are drawn one at a time when encoded.
    probs = _sigmoid(np.asarray(pred_masks)[keep]) if with_masks and keep.size else None
    return tuple(
        Detection(
            score=float(scores[q]),
            box=tuple(float(v) for v in boxes[q] * scale),  # type: ignore[arg-type]
            mask=None if probs is None else LowResMask(probs[i], (height, width), mask_threshold),
        )
        for i, q in enumerate(keep)
    )


def upsample_masks(mask_logits: np.ndarray, size: tuple[int, int], mask_threshold: float) -> np.ndarray:
    """[K, h, w] logits -> [K, H, W] bool: sigmoid, bilinear resize, threshold (transformers' order).

    Holds all K masks at full resolution: for tools and tests; ``postprocess`` never calls it."""
    probs = _sigmoid(mask_logits)
    out = np.empty((probs.shape[0], *size), dtype=bool)
    for i, prob in enumerate(probs):
        out[i] = LowResMask(prob, size, mask_threshold).render()
    return out


# ----------------------------------------------------------------------------------------------
# Mask encodings
# ----------------------------------------------------------------------------------------------


def encode_mask(mask: np.ndarray | MaskSource, fmt: str) -> dict[str, Any] | None:
    """One mask (a bool [H, W] array, or a detection's ``mask_source``) as rle (COCO, compressed
    counts) | png (base64) | polygon | none."""
    check_format(fmt)
    if fmt == "none":
        return None
    return (mask if isinstance(mask, MaskSource) else DenseMask(mask)).encode(fmt)


def decode_mask(data: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_mask` for rle and png (clients and tests use it)."""
    height, width = data["size"]
    if data["format"] == "rle":
        rle = {"size": [height, width], "counts": data["counts"].encode("ascii")}
        return mask_utils.decode(rle).astype(bool)
    if data["format"] == "png":
        buf = np.frombuffer(base64.b64decode(data["data"]), dtype=np.uint8)
        return cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE) > 0
    if data["format"] == "polygon":
        out = np.zeros((height, width), dtype=np.uint8)
        pts = [np.asarray(p, dtype=np.int32).reshape(-1, 1, 2) for p in data["polygons"]]
        cv2.fillPoly(out, pts, 1)
        return out.astype(bool)
    raise InvalidOption(f"cannot decode mask format {data.get('format')!r}")


def result_document(
    image_size: ImageSize | tuple[int, int], results: Sequence[PromptResult], mask_format: str = "rle"
) -> dict[str, Any]:
    """The response document of ``python -m engines segment --json`` and the server's /segment.

    ``{"image_size": {"width", "height"}, "results": [{"prompt", "detections": [{"score",
    "box": [x0, y0, x1, y1], "mask": {...} | None}]}]}``; detections keep their (descending
    score) order. ``image_size`` is (width, height), as :class:`~engines.types.ImageSize`.
    """
    if mask_format not in MASK_FORMATS:
        raise InvalidOption(f"mask format {mask_format!r} is not one of {', '.join(MASK_FORMATS)}")
    width, height = (int(v) for v in image_size)
    return {
        "image_size": {"width": width, "height": height},
        "results": [
            {
                "prompt": result.prompt,
                "detections": [
                    {
                        "score": float(det.score),
                        "box": [float(v) for v in det.box],
                        # one full-resolution mask at a time, dropped once encoded
                        "mask": None if det.mask_source is None else det.mask_source.encode(mask_format),
                    }
                    for det in result.detections
                ],
            }
            for result in results
        ],
    }
