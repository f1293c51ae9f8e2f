"""Full-resolution masks drawn one at a time from the decoder's low-resolution output.

The mask is ``bilinear(probs) > threshold`` as transformers/OpenCV compute it; RLE comes from the
per-column intervals without the H x W raster, and every format encodes the same pixels.
"""

from __future__ import annotations

import time
import tracemalloc

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from engines.options import SegmentOptions
from engines.masks import DenseMask, LowResMask, _taps
from engines.postprocess import postprocess, result_document
from engines.types import PromptResult


def _dense(probs: np.ndarray, size: tuple[int, int], t: float) -> np.ndarray:
    """The same bilinear interpolation evaluated at every pixel (the definition)."""
    h, w = probs.shape
    tx, ty = _taps(w, size[1]), _taps(h, size[0])
    c = probs[:, tx.i0] * tx.w0 + probs[:, tx.i1] * tx.w1
    return (c[ty.i0] * ty.w0[:, None] + c[ty.i1] * ty.w1[:, None]) > np.float32(t)


def _probs(rng: np.random.Generator, h: int, w: int, blob: bool) -> np.ndarray:
    logits = rng.normal(0, 3, (h, w))
    if blob:
        yy, xx = np.mgrid[0:h, 0:w]
        logits = (min(h, w) / 3 - np.hypot(yy - h / 2, xx - w / 2)) + rng.normal(0, 0.5, (h, w))
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


def test_every_format_encodes_the_interpolated_mask() -> None:
    rng = np.random.default_rng(0)
    off_cv2 = 0
    for trial in range(150):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        size = tuple(int(v) for v in rng.integers(1, 260, 2))
        t = float(rng.choice([0.0, 0.3, 0.5, 0.9]))
        probs = _probs(rng, h, w, blob=trial % 2 == 0)
        mask = LowResMask(probs, size, t)
        raster = mask.render()
        assert raster.shape == size and raster.dtype == bool
        assert np.array_equal(raster, _dense(probs, size, t)), trial
        off_cv2 += int((raster != (cv2.resize(probs, size[::-1], interpolation=cv2.INTER_LINEAR) > t)).sum())
        # RLE straight from the intervals: pycocotools' own encoding of the raster, byte for byte.
        rle = mask.rle()
        reference = mask_utils.encode(np.asfortranarray(raster.astype(np.uint8)))["counts"].decode()
        assert rle["counts"] == reference and rle["size"] == list(size), trial
        assert mask.area() == int(raster.sum())
        # Polygons from the mask's window equal polygons of the whole raster.
        assert mask.encode("polygon") == DenseMask(raster).encode("polygon"), trial
        assert mask.encode("png") == DenseMask(raster).encode("png")
        y0, x0 = (int(v) for v in rng.integers(0, size))
        window = mask.render((y0, size[0]), (x0, size[1]))
        assert np.array_equal(window, raster[y0:, x0:])
    # OpenCV's INTER_LINEAR is the same interpolation (it rounds its coefficients differently).
    assert off_cv2 <= 10


def test_rle_never_builds_the_raster_and_is_linear_in_masks() -> None:
    """At 40 MP a bool mask is 40 MB: encoding 20 of them as RLE stays far below one raster."""
    rng = np.random.default_rng(1)
    size = (5164, 7744)
    masks = [LowResMask(_probs(rng, 72, 72, blob=True), size, 0.5) for _ in range(20)]
    tracemalloc.start()
    try:
        started = time.perf_counter()
        masks[0].rle()
        one = time.perf_counter() - started
        tracemalloc.reset_peak()
        started = time.perf_counter()
        encoded = [m.rle() for m in masks]
        many = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(e["size"] == list(size) for e in encoded)
    assert peak < 40e6 / 2, f"{peak / 1e6:.1f} MB traced while encoding"  # one raster: 40 MB
    assert many < 20 * one * 5 + 1.0  # linear in the number of masks (generous: busy CI)


def test_a_request_holds_low_resolution_masks_only() -> None:
    """postprocess keeps each kept query's [h, w] probabilities; result_document draws one full
    mask at a time: 200 detections at 40 MP never hold 200 x 40 MB."""
    rng = np.random.default_rng(2)
    queries = 200
    size = (5164, 7744)
    masks = np.stack([_probs(rng, 72, 72, blob=True) for _ in range(queries)]) * 8 - 4
    boxes = np.tile(np.asarray([[0.1, 0.1, 0.6, 0.6]], np.float32), (queries, 1))
    tracemalloc.start()
    try:
        dets = postprocess(masks.astype(np.float32), boxes, np.full(queries, 5.0, np.float32), 5.0, size,
                           SegmentOptions(score_threshold=0.0))
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        doc = result_document(size[::-1], [PromptResult("p", dets[:12])], "rle")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(dets) == queries and held < queries * 72 * 72 * 4 * 2
    assert len(doc["results"][0]["detections"]) == 12
    assert peak < 40e6, f"{peak / 1e6:.1f} MB traced while encoding 12 masks of 40 MP"


@pytest.mark.parametrize("fmt", ["png", "polygon"])
def test_raster_formats_hold_one_mask_at_a_time(fmt: str) -> None:
    rng = np.random.default_rng(3)
    size = (3000, 4000)
    dets = postprocess(np.stack([_probs(rng, 32, 32, True) * 8 - 4 for _ in range(6)]).astype(np.float32),
                       np.full((6, 4), 0.5, np.float32), np.full(6, 5.0, np.float32), 5.0, size,
                       SegmentOptions(score_threshold=0.0))
    tracemalloc.start()
    try:
        result_document(size[::-1], [PromptResult("p", dets)], fmt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 3 * size[0] * size[1], f"{peak / 1e6:.1f} MB for 6 masks of {size}"
