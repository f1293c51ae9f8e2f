"""Typed results of the pipeline (nanoowl-style): what encode/decode return and the cache stores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image: RGB uint8 pixels after EXIF orientation, plus the id of its bytes."""

    pixels: np.ndarray  # [H, W, 3] uint8, RGB
    image_id: str  # sha256 hex of the original bytes (or of the pixels for in-memory arrays)

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class ImageEmbedding:
    """Image-encoder outputs for one image (batch 1), keyed by manifest tensor names.

    This is what the server caches: it holds everything the decoder needs from the image,
    including the geometry CLS token, so a new prompt never reruns the image encoder.
    """

    image_id: str
    original_size: tuple[int, int]  # (height, width) of the original image
    tensors: dict[str, np.ndarray]
    encoder_key: str = ""  # weights hash of the image encoder that produced it

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))


@dataclass(frozen=True)
class TextEmbedding:
    """Text-encoder outputs for N prompts, batch-aligned with ``prompts``."""

    prompts: tuple[str, ...]
    tensors: dict[str, np.ndarray]  # text features [N, L, C] and the mask [N, L]

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))


@dataclass(frozen=True)
class Detection:
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels
    mask: np.ndarray | None = None  # [H, W] bool at the original size, or None


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    detections: tuple[Detection, ...]  # sorted by descending score


@dataclass
class SegmentResult:
    image_id: str
    image_size: tuple[int, int]  # (width, height)
    results: list[PromptResult]
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
