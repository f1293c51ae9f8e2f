"""Masks at the original resolution, drawn one at a time from the decoder's low-resolution output.

A detection keeps its mask as the decoder gave it (:class:`LowResMask`: ``[h, w]`` probabilities,
288x288 at full SAM3 size) and the full-resolution mask is computed only where it is needed: one
mask at a time, while it is encoded. A request therefore never holds all its masks at full
resolution; at 40 MP one bool mask is 40 MB, and 16 prompts x 10 detections of them measured
17.5 GB before this module existed.

The upsampling is transformers' (``sigmoid -> F.interpolate(bilinear, align_corners=False) ->
> threshold``) and OpenCV's ``INTER_LINEAR``: half-pixel centres, edge clamping, separable. It is
computed here in numpy, in two steps, so that COCO RLE never needs the H x W raster:

1. the horizontal pass gives ``C = [h, W]`` (each low-res row resampled to the output width);
2. the output rows that share the same pair of source rows form a *block*; inside a block, a
   column's value is ``a * (1 - t) + b * t`` with ``t`` growing with the row, i.e. monotone, so
   the pixels over the threshold are a prefix or a suffix of the block. Its end is found by
   bisection on the same float32 expression a dense evaluation would use.

That gives every mask as at most one interval per (block, column): COCO's column-major runs come
straight from the intervals in O(h x W) work and memory, instead of O(H x W); the raster (PNG,
polygons, :attr:`engines.types.Detection.mask`) is filled from the same intervals, so every
format encodes the same pixels.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

MASK_FORMATS = ("rle", "png", "polygon", "none")

# Values this far from the threshold are over/under it whatever the float rounding of the
# interpolation (|error| < 1e-6 for probabilities in [0, 1]): only columns that cross it in a
# block need the bisection.
_SURE = 1e-5


@dataclass(frozen=True)
class _Taps:
    """Linear-interpolation taps of one axis: out[i] = in[i0] * w0 + in[i1] * w1."""

    i0: np.ndarray  # int64 [n_out], non-decreasing
    i1: np.ndarray
    w0: np.ndarray  # float32
    w1: np.ndarray


@lru_cache(maxsize=64)
def _taps(n_in: int, n_out: int) -> _Taps:
    # OpenCV resize (INTER_LINEAR): fx = (float)((dx + 0.5) * scale - 0.5); sx = floor(fx);
    # fx -= sx; clamped to the first/last source pixel with weight 0 outside.
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    w1 = (f - i0.astype(np.float32)).astype(np.float32)
    outside = (i0 < 0) | (i0 >= n_in - 1)
    w1[outside] = 0.0
    i0 = np.clip(i0, 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w0 = (np.float32(1.0) - w1).astype(np.float32)
    for a in (i0, i1, w0, w1):
        a.setflags(write=False)
    return _Taps(i0, i1, w0, w1)


class MaskSource:
    """Something that can draw one full-resolution bool mask and encode it (one at a time)."""

    @property
    def shape(self) -> tuple[int, int]:  # (height, width)
        raise NotImplementedError

    def render(self) -> np.ndarray:
        """The [H, W] bool mask (allocated now; callers keep it only as long as they need it)."""
        raise NotImplementedError

    def rle(self) -> dict[str, Any]:
        return _rle_from_raster(self.render())

    def encode(self, fmt: str) -> dict[str, Any] | None:
        """The mask as rle (COCO compressed counts) | png (base64) | polygon | none."""
        check_format(fmt)
        if fmt == "none":
            return None
        if fmt == "rle":
            return self.rle()
        if fmt == "png":
            return _png(self.render())
        return _polygons(self.render(), (0, 0), self.shape)


@dataclass(frozen=True, eq=False)
class DenseMask(MaskSource):
    """A mask that already is a full-resolution array (clients, tests, other pipelines)."""

    array: np.ndarray

    def __post_init__(self) -> None:
        array = np.asarray(self.array, dtype=bool)
        if array.ndim != 2:
            raise ValueError(f"a mask must be 2-D, got shape {array.shape}")
        object.__setattr__(self, "array", array)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.array.shape[0]), int(self.array.shape[1]))

    def render(self) -> np.ndarray:
        return self.array


@dataclass(frozen=True, eq=False)
class LowResMask(MaskSource):
    """One detection's mask as the decoder produced it, drawn at ``shape`` on demand.

    ``probs`` are sigmoid(mask logits), ``[h, w]`` float32 (a copy: the decoder's output batch
    is freed). The mask is ``bilinear(probs, shape) > threshold``.
    """

    probs: np.ndarray = field(repr=False)
    size: tuple[int, int]  # (height, width) of the original image
    threshold: float

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.size[0]), int(self.size[1]))

    @property
    def nbytes(self) -> int:
        return int(self.probs.nbytes)

    # -- the intervals ----------------------------------------------------------------------
    def intervals(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(block_start, block_end, cols, first, last)``: rows ``[first[k, j], last[k, j])`` of
        column ``cols[j]`` are in the mask, block ``k`` spanning rows
        ``[block_start[k], block_end[k])``; ``first == last`` where that block is empty. Columns
        not in ``cols`` (ascending) are empty. ``first``/``last`` are [blocks, len(cols)]."""
        height, width = self.shape
        probs = np.asarray(self.probs, dtype=np.float32)
        h, w = probs.shape
        tx, ty = _taps(w, width), _taps(h, height)
        t = np.float32(self.threshold)
        # Horizontal pass, every source row: [h, W]; then only the columns that reach the
        # threshold somewhere (a value is a convex combination of its column's).
        c = probs[:, tx.i0] * tx.w0 + probs[:, tx.i1] * tx.w1
        cols = np.flatnonzero(c.max(axis=0) > t - _SURE)
        c = c[:, cols]
        # Blocks: runs of output rows reading the same pair of source rows.
        starts = np.flatnonzero(np.r_[True, ty.i0[1:] != ty.i0[:-1]])
        ends = np.r_[starts[1:], height]
        a = c[ty.i0[starts]]  # [blocks, cols]: the value at the block's first row ...
        b = c[ty.i1[starts]]  # ... and the one it moves towards, row by row
        rising = b >= a
        full = np.minimum(a, b) > t + _SURE
        empty = np.maximum(a, b) < t - _SURE
        s = np.broadcast_to(starts[:, None], a.shape)
        e = np.broadcast_to(ends[:, None], a.shape)
        first = np.where(full, s, e).astype(np.int32)  # empty: first = last = the block's end
        last = e.astype(np.int32)
        cross = np.flatnonzero(~(full | empty))
        if cross.size:
            k = cross // max(cols.size, 1)
            ca, cb, up = a.ravel()[cross], b.ravel()[cross], rising.ravel()[cross]
            s0, n = starts[k], (ends[k] - starts[k]).astype(np.int64)
            # Bisection for the first row i in [0, n) where (value > t) == up: for a rising
            # column the first pixel in the mask, for a falling one the first pixel out of it.
            lo = np.zeros(cross.size, dtype=np.int64)
            hi = n.copy()
            while True:
                open_ = lo < hi
                if not open_.any():
                    break
                mid = (lo + hi) // 2
                row = s0 + np.minimum(mid, n - 1)
                hit = ((ca * ty.w0[row] + cb * ty.w1[row]) > t) == up
                hi = np.where(open_ & hit, mid, hi)
                lo = np.where(open_ & ~hit, mid + 1, lo)
            first.reshape(-1)[cross] = np.where(up, s0 + lo, s0)
            last.reshape(-1)[cross] = np.where(up, s0 + n, s0 + lo)
        return starts, ends, cols, first, last

    def _column_runs(self) -> tuple[np.ndarray, np.ndarray]:
        """Runs ``[start, end)`` in column-major pixel order (COCO's), adjacent ones merged."""
        height, _ = self.shape
        _, _, cols, first, last = self.intervals()
        keep = (last > first).T  # column-major: by column, then by block
        where = np.nonzero(keep)
        offset = cols.astype(np.int64)[where[0]] * height
        start = first.T[where] + offset
        end = last.T[where] + offset
        if start.size == 0:
            return start, end
        new = np.r_[True, start[1:] != end[:-1]]
        return start[new], end[np.r_[new[1:], True]]

    # -- encodings --------------------------------------------------------------------------
    def area(self) -> int:
        start, end = self._column_runs()
        return int((end - start).sum())

    def rle(self) -> dict[str, Any]:
        height, width = self.shape
        start, end = self._column_runs()
        counts = np.empty(2 * start.size + 1, dtype=np.int64)
        counts[0::2] = np.r_[start, height * width] - np.r_[0, end]
        counts[1::2] = end - start
        if counts.size > 1 and counts[-1] == 0:
            counts = counts[:-1]  # as pycocotools writes a mask that ends on a pixel in it
        rle = mask_utils.frPyObjects({"counts": counts.tolist(), "size": [height, width]}, height, width)
        return {"format": "rle", "size": [height, width], "counts": rle["counts"].decode("ascii")}

    def render(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> np.ndarray:
        """The mask, or its ``[rows[0]:rows[1], cols[0]:cols[1]]`` window (the same pixels)."""
        height, width = self.shape
        y0, y1 = rows or (0, height)
        x0, x1 = cols or (0, width)
        starts, ends, where, first, last = self.intervals()
        inside = (where >= x0) & (where < x1)
        where, first, last = where[inside] - x0, first[:, inside], last[:, inside]
        out = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for k in np.flatnonzero((last > first).any(axis=1) & (ends > y0) & (starts < y1)):
            top, bottom = max(int(starts[k]), y0), min(int(ends[k]), y1)
            r = np.arange(top, bottom)[:, None]
            out[top - y0 : bottom - y0, where] = (r >= first[k]) & (r < last[k])
        return out

    def encode(self, fmt: str) -> dict[str, Any] | None:
        check_format(fmt)
        if fmt != "polygon":
            return super().encode(fmt)
        # Contours of the mask's bounding window (plus a blank border) only: outside it the mask
        # is empty, so they are the contours of the whole image.
        height, width = self.shape
        _, _, where, first, last = self.intervals()
        filled = last > first
        if not filled.any():
            return {"format": "polygon", "size": [height, width], "polygons": []}
        used = where[filled.any(axis=0)]
        y0, y1 = max(int(first[filled].min()) - 1, 0), min(int(last[filled].max()) + 1, height)
        x0, x1 = max(int(used[0]) - 1, 0), min(int(used[-1]) + 2, width)
        return _polygons(self.render((y0, y1), (x0, x1)), (x0, y0), self.shape)


def check_format(fmt: str) -> None:
    from engines.errors import InvalidOption  # engines.errors imports nothing of ours

    if fmt not in MASK_FORMATS:
        raise InvalidOption(f"mask format {fmt!r} is not one of {', '.join(MASK_FORMATS)}")


def _rle_from_raster(mask: np.ndarray) -> dict[str, Any]:
    height, width = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"format": "rle", "size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")}


def _png(mask: np.ndarray) -> dict[str, Any]:
    ok, buf = cv2.imencode(".png", mask.view(np.uint8) * np.uint8(255), [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError("PNG encoding of a mask failed")
    height, width = mask.shape
    return {"format": "png", "size": [int(height), int(width)], "data": base64.b64encode(buf.tobytes()).decode("ascii")}


def _polygons(region: np.ndarray, offset: tuple[int, int], shape: tuple[int, int]) -> dict[str, Any]:
    contours, _ = cv2.findContours(
        region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE, offset=offset
    )
    polygons = [c.reshape(-1).astype(int).tolist() for c in contours if len(c) >= 3]
    return {"format": "polygon", "size": [int(shape[0]), int(shape[1])], "polygons": polygons}
