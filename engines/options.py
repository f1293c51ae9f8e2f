"""What a caller may ask of the pipeline, and the limits it asks within: one type each.

:class:`Limits` bounds a call (image megapixels, prompts per call, characters per prompt,
detections per prompt); :class:`SegmentOptions` holds one call's decoding choices. Each checks
itself when it is built, so the pipeline, ``python -m engines`` and the server apply one set of
rules; the server's request models quote the same bounds (``THRESHOLD_MIN`` ...) in its OpenAPI
schema, and its settings pass their values in as a :class:`Limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from engines.errors import InvalidOption

THRESHOLD_MIN, THRESHOLD_MAX = 0.0, 1.0
MIN_DETECTIONS = 1  # a request for zero detections is a mistake, not a query

DEFAULT_MAX_MEGAPIXELS = 40.0
DEFAULT_MAX_PROMPTS = 16
# The text encoder reads 32 tokens; 200 characters is already several times what fits.
DEFAULT_MAX_PROMPT_CHARS = 200


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Limits:
    """Bounds of one call. ``max_detections`` None: every query over the threshold is kept."""

    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    max_prompts: int = DEFAULT_MAX_PROMPTS
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_detections: int | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.max_megapixels) or self.max_megapixels <= 0:
            raise InvalidOption(f"max_megapixels must be a positive number, got {self.max_megapixels!r}")
        for name in ("max_prompts", "max_prompt_chars"):
            value = getattr(self, name)
            if not _is_count(value) or value < 1:
                raise InvalidOption(f"{name} must be a positive integer, got {value!r}")
        if self.max_detections is not None and (
            not _is_count(self.max_detections) or self.max_detections < MIN_DETECTIONS
        ):
            raise InvalidOption(f"max_detections must be a positive integer or None, got {self.max_detections!r}")


@dataclass(frozen=True)
class SegmentOptions:
    """Decoding choices of one call; :meth:`within` applies a :class:`Limits`.

    ``max_detections`` None means "as many as the limits allow". ``with_masks`` False skips
    mask upsampling (boxes and scores only).
    """

    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int | None = None
    with_masks: bool = True

    def __post_init__(self) -> None:
        for name in ("score_threshold", "mask_threshold"):
            value = getattr(self, name)
            if not _is_number(value) or not THRESHOLD_MIN <= float(value) <= THRESHOLD_MAX:
                raise InvalidOption(
                    f"{name} must be a number in [{THRESHOLD_MIN:g}, {THRESHOLD_MAX:g}], got {value!r}"
                )
        if self.max_detections is not None and (
            not _is_count(self.max_detections) or self.max_detections < MIN_DETECTIONS
        ):
            raise InvalidOption(
                f"max_detections must be an integer >= {MIN_DETECTIONS} or None, got {self.max_detections!r}"
            )
        if not isinstance(self.with_masks, bool):
            raise InvalidOption(f"with_masks must be true or false, got {self.with_masks!r}")

    def within(self, limits: Limits) -> SegmentOptions:
        """These options under ``limits``: the detection cap filled in, or InvalidOption above it."""
        cap = limits.max_detections
        if cap is None:
            return self
        if self.max_detections is None:
            return replace(self, max_detections=cap)
        if self.max_detections > cap:
            raise InvalidOption(f"max_detections must be within [{MIN_DETECTIONS}, {cap}], got {self.max_detections}")
        return self
