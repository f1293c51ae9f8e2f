"""Typed results of the pipeline (nanoowl-style): what encode/decode return and the cache stores.

Each result carries the milliseconds of the stages that produced it (``timings_ms``, keyed by
:data:`STAGES` names), so a caller that caches embeddings (the server) reports what a request
actually ran without timing the pipeline from outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np

from engines.errors import InvalidBox
from engines.masks import DenseMask, MaskSource

# Pipeline stages, in order: the keys of every ``timings_ms`` below (plus "total" on a segment).
STAGES = ("preprocess", "image_encoder", "text_encoder", "geometry_encoder", "decoder", "postprocess")


def add_timings(*records: dict[str, float]) -> dict[str, float]:
    """Milliseconds per stage summed over ``records`` (a call's own, and the embeddings it was
    given that the caller computed for the same request), every stage of :data:`STAGES` present."""
    total = {stage: 0.0 for stage in STAGES}
    for record in records:
        for stage, ms in record.items():
            total[stage] = total.get(stage, 0.0) + ms
    return total


class ImageSize(NamedTuple):
    """An image's size, always (width, height); ``shape`` is numpy's (height, width)."""

    width: int
    height: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)


class Prompts(tuple[str, ...]):
    """Prompt texts that passed :meth:`engines.tokenizer.PromptTokenizer.validate`.

    Code handed a ``Prompts`` does not check again. A subset of validated texts is valid too
    (the server encodes only the ones its text cache lacks).
    """

    __slots__ = ()


@dataclass(frozen=True)
class ExemplarBox:
    """One exemplar box in original-image pixels (x0, y0, x1, y1); negative: "not like this"."""

    box: tuple[float, float, float, float]
    positive: bool = True


@dataclass(frozen=True)
class Prompt:
    """A prompt given by text, exemplar boxes, or both: Meta's text prompt plus geometric prompt.

    Without text the model is given the text "visual", as Meta's ``add_geometric_prompt`` and
    transformers' processor do for a box-only prompt.
    """

    text: str | None = None
    boxes: tuple[ExemplarBox, ...] = ()

    @classmethod
    def from_wire(cls, boxes: Sequence[Sequence[float]], labels: Sequence[int] | None = None,
                  text: str | None = None, index: int = 0) -> "Prompt":
        """The API's form (``boxes`` as [x0, y0, x1, y1], ``labels`` 1/0, default all 1) as the
        pipeline takes it; :class:`InvalidBox` names prompt ``index`` when the form is wrong. The
        boxes themselves are checked against the image by ``Sam3Pipeline.check_prompts``."""
        labels = list(labels) if labels is not None else [1] * len(boxes)
        where = f"prompt {index}"
        if not boxes:
            raise InvalidBox(f"{where}: an exemplar entry needs at least one box")
        if len(labels) != len(boxes):
            raise InvalidBox(f"{where}: {len(labels)} labels for {len(boxes)} boxes")
        if any(label not in (0, 1) for label in labels):
            raise InvalidBox(f"{where}: labels are 1 (positive) or 0 (negative), got {labels}")
        for box in boxes:
            if len(box) != 4:
                raise InvalidBox(f"{where}: a box is [x0, y0, x1, y1], got {list(box)}")
        return cls(text=text, boxes=tuple(ExemplarBox((float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                                                      positive=bool(label)) for box, label in zip(boxes, labels)))

    @property
    def model_text(self) -> str:
        return self.text if self.text is not None else BOX_ONLY_TEXT

    @property
    def name(self) -> str:
        """How results name this prompt: its text, or "visual" for boxes alone."""
        return self.model_text


BOX_ONLY_TEXT = "visual"


@dataclass(frozen=True)
class CheckedPrompts:
    """Prompts that passed ``Sam3Pipeline.check_prompts``: made there only, never checked again.

    ``image_size`` is the image the boxes were checked against (None: everything but the
    bounds was checked, as a server does before it has decoded the image; ``segment`` then
    checks the bounds alone).
    """

    items: tuple[Prompt, ...]
    texts: Prompts  # what the text encoder reads, one per prompt ("visual" for boxes alone)
    image_size: ImageSize | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.items)

    def __getitem__(self, index: int) -> Prompt:
        return self.items[index]

    @property
    def has_boxes(self) -> bool:
        return any(p.boxes for p in self.items)


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

    @property
    def size(self) -> ImageSize:
        return ImageSize(self.width, self.height)


@dataclass(frozen=True)
class ImageEmbedding:
    """Image-encoder outputs for one image (batch 1), keyed by manifest tensor names.

    This is what the server caches: it holds everything the decoder needs from the image,
    including the geometry CLS token, so a new prompt never reruns the image encoder.
    """

    image_id: str
    image_size: ImageSize  # of the original image (after EXIF orientation)
    tensors: dict[str, np.ndarray]
    encoder_key: str = ""  # weights hash of the image encoder that produced it
    # preprocess + image_encoder ms of the run that computed it (a cached copy keeps them)
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))


@dataclass(frozen=True)
class TextEmbedding:
    """Text-encoder outputs for N prompts, batch-aligned with ``prompts``."""

    prompts: tuple[str, ...]
    tensors: dict[str, np.ndarray]  # text features [N, L, C] and the mask [N, L]
    # preprocess + text_encoder ms of the run that computed it ({} for rows taken from a cache)
    timings_ms: dict[str, float] = field(default_factory=dict, compare=False)

    def row(self, index: int) -> "TextEmbedding":
        """Prompt ``index`` alone, as a cache keeps it (a copy: the batch can be freed)."""
        return TextEmbedding(prompts=(self.prompts[index],),
                             tensors={k: v[index : index + 1].copy() for k, v in self.tensors.items()})

    @classmethod
    def stack(cls, rows: Sequence["TextEmbedding"], timings_ms: dict[str, float] | None = None) -> "TextEmbedding":
        """Embeddings one after another, as one (e.g. rows from a cache, in a request's order)."""
        if len(rows) == 1:
            return cls(prompts=rows[0].prompts, tensors=rows[0].tensors, timings_ms=dict(timings_ms or {}))
        return cls(prompts=tuple(p for r in rows for p in r.prompts),
                   tensors={k: np.concatenate([r.tensors[k] for r in rows], axis=0) for k in rows[0].tensors},
                   timings_ms=dict(timings_ms or {}))

    @property
    def nbytes(self) -> int:
        return int(sum(t.nbytes for t in self.tensors.values()))


@dataclass(frozen=True, init=False, eq=False)
class Detection:
    """One detection. Its full-resolution mask is drawn from ``mask_source`` each time ``mask``
    is read and never stored, so holding many detections never holds many full-size masks."""

    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in original-image pixels
    mask_source: MaskSource | None = field(repr=False)  # None: no mask asked for (boxes, scores only)

    def __init__(
        self, score: float, box: tuple[float, float, float, float], mask: np.ndarray | MaskSource | None = None
    ) -> None:
        source = mask if mask is None or isinstance(mask, MaskSource) else DenseMask(mask)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "mask_source", source)

    @property
    def mask(self) -> np.ndarray | None:
        """[H, W] bool at the original size (computed now), or None."""
        return None if self.mask_source is None else self.mask_source.render()


@dataclass(frozen=True)
class PromptResult:
    prompt: str
    detections: tuple[Detection, ...]  # sorted by descending score


@dataclass
class SegmentResult:
    image_id: str
    image_size: ImageSize
    results: list[PromptResult]
    timings_ms: dict[str, float] = field(default_factory=dict)  # STAGES run by this call + "total"
    cache_hit: bool = False  # the image arrived as an ImageEmbedding: no image encoder run
    extra: dict[str, Any] = field(default_factory=dict)  # backend kind and precision
