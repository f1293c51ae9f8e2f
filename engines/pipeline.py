"""``Sam3Pipeline``: image + prompts -> per-prompt detections, on any backend, without torch.

The shape follows nanoowl's ``OwlPredictor``: ``encode_image`` and ``encode_text`` return
small dataclasses the server caches (:class:`~engines.types.ImageEmbedding`,
:class:`~engines.types.TextEmbedding`), and ``decode`` combines them. ``segment`` is the
one-call convenience the CLI uses; given embeddings it runs only the decoder, which is how the
server uses it after its cache lookups.

Every size, name and dtype comes from the bundle manifest, so a SAM3-Small or LoRA bundle
runs through the same code as full SAM3. What a caller may ask is one
:class:`~engines.options.SegmentOptions`, bounded by the pipeline's
:class:`~engines.options.Limits`.

Thread-safety: the engine calls (``encode_*``, ``decode``, ``segment``) are driven by one thread
at a time (the server's single inference worker); ``stage_calls`` is a plain counter. Timings
are measured per call and returned in the results, so ``load_image`` and the validation helpers
are safe from any thread.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engines.backend import Backend, PartRunner
from engines.bundle import EXEMPLAR_PART_NAMES, PART_NAMES, Bundle, TensorNames
from engines.errors import BundleError, EngineError, ExemplarsUnsupported, InvalidBox, InvalidInput, InvalidPrompt
from engines.factory import open_backend
from engines.options import Limits, SegmentOptions
from engines.postprocess import postprocess
from engines.preprocess import ImageSource, load_image, to_pixel_values
from engines.tokenizer import PromptTokenizer, prompt_list
from engines.types import (
    BOX_ONLY_TEXT,
    STAGES,
    CheckedPrompts,
    ImageEmbedding,
    ImageSize,
    LoadedImage,
    Prompt,
    PromptResult,
    SegmentResult,
    TextEmbedding,
    add_timings,
)

__all__ = ["STAGES", "Sam3Pipeline"]


class _Stopwatch:
    """Milliseconds per stage of one call: a local object, so the pipeline holds no timing state."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - started) * 1000.0)

    def add(self, name: str, ms: float) -> None:
        self.ms[name] = self.ms.get(name, 0.0) + ms

    def merge(self, timings: dict[str, float]) -> None:
        for name, ms in timings.items():
            self.add(name, ms)

    def rounded(self) -> dict[str, float]:
        return {name: round(ms, 3) for name, ms in self.ms.items()}


class Sam3Pipeline:
    """Preprocess -> image encoder / text encoder -> one batched decoder call -> postprocess."""

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        *,
        limits: Limits | None = None,
        max_megapixels: float | None = None,
        max_prompts: int | None = None,
        max_prompt_chars: int | None = None,
    ) -> None:
        """``limits`` (default :class:`Limits`'s), with any ``max_*`` keyword given in its place."""
        given = {
            name: value
            for name, value in (
                ("max_megapixels", max_megapixels),
                ("max_prompts", max_prompts),
                ("max_prompt_chars", max_prompt_chars),
            )
            if value is not None
        }
        self.limits = replace(limits or Limits(), **given)
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.tokenizer = PromptTokenizer.from_bundle(
            bundle, max_chars=self.limits.max_prompt_chars, max_prompts=self.limits.max_prompts
        )
        image_part = self.manifest.part("image_encoder")
        text_part = self.manifest.part("text_encoder")
        # The decoder is fed by name from the two embeddings: check the wiring once, here, so a
        # drifted manifest is a BundleError at startup rather than a failure per request.
        fed = set(image_part.output_names) | {TensorNames.TEXT_FEATURES, TensorNames.TEXT_MASK}
        unfed = [name for name in self.manifest.part("decoder").input_names if name not in fed]
        if unfed:
            raise BundleError(f"decoder inputs {unfed} are produced by neither encoder")
        # Load all three parts now: a missing plan or a bad graph fails at startup, not at the
        # first request (and /readyz can mean "ready").
        self.parts: dict[str, PartRunner] = {name: backend.load(name) for name in PART_NAMES}
        # Exemplar (box) prompts need two more graphs; a bundle or backend without them still
        # serves text, and says why it cannot take boxes.
        self.max_boxes = 0
        self.exemplars_unavailable = "this bundle has no exemplar graphs (rebuild it with python -m export build)"
        if self.manifest.max_boxes:
            try:
                for name in EXEMPLAR_PART_NAMES:
                    self.parts[name] = backend.load(name)
            except EngineError as exc:
                self.exemplars_unavailable = f"the {backend.kind} backend cannot run the exemplar graphs: {exc}"
            else:
                self.max_boxes = self.manifest.max_boxes
                self.exemplars_unavailable = ""
        self._box_only_text: TextEmbedding | None = None  # "visual", encoded once
        # Cache keys. Keyed by weights, not by the ONNX file: LoRA bundles that only touch the
        # decoder share the image encoder, so they can share the server's embedding cache.
        self.encoder_key = image_part.weights_sha256 or image_part.sha256
        # A text embedding depends on the text encoder's weights and on the tokenizer.
        self.text_encoder_key = (
            f"{text_part.weights_sha256 or text_part.sha256}:{self.tokenizer.tokenizer_hash}"
        )
        self.stage_calls: Counter[str] = Counter()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | Bundle,
        backend: str = "auto",
        *,
        limits: Limits | None = None,
        max_megapixels: float | None = None,
        max_prompts: int | None = None,
        max_prompt_chars: int | None = None,
        **backend_options: Any,
    ) -> "Sam3Pipeline":
        """Open a bundle directory and a backend (``auto``, ``onnxruntime`` or ``tensorrt``).

        ``backend_options`` are :func:`engines.factory.open_backend`'s keywords.
        """
        bundle = path if isinstance(path, Bundle) else Bundle(path)
        engine = open_backend(bundle, backend, **backend_options)
        try:
            return cls(
                bundle,
                engine,
                limits=limits,
                max_megapixels=max_megapixels,
                max_prompts=max_prompts,
                max_prompt_chars=max_prompt_chars,
            )
        except BaseException:
            engine.close()
            raise

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Sam3Pipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """The model, backend, limits and cache keys of this pipeline (for logs and tools; /info
        reports the manifest's own summary)."""
        model = self.manifest.model
        return {
            "bundle": self.manifest.name,
            "image_size": model.image_size,
            "num_queries": model.num_queries,
            "context_length": self.manifest.tokenizer.context_length,
            "backend": self.backend.describe(),
            "max_batch": {name: part.max_batch for name, part in self.parts.items()},
            "limits": {
                "max_megapixels": self.limits.max_megapixels,
                "max_prompts": self.limits.max_prompts,
                "max_prompt_chars": self.limits.max_prompt_chars,
                "max_detections": self.limits.max_detections,
            },
            "encoder_key": self.encoder_key,
            "text_encoder_key": self.text_encoder_key,
            "exemplars": {"max_boxes": self.max_boxes, **(
                {"unavailable": self.exemplars_unavailable} if self.exemplars_unavailable else {})},
        }

    # ------------------------------------------------------------------ checks (any thread)

    def check_options(self, options: SegmentOptions | None = None) -> SegmentOptions:
        """One call's options (default: the defaults) under this pipeline's limits."""
        return (options if options is not None else SegmentOptions()).within(self.limits)

    def check_prompts(self, prompts: Sequence[str | Prompt] | CheckedPrompts,
                      image_size: ImageSize | None = None) -> CheckedPrompts:
        """Typed errors for prompts this pipeline would refuse; checked prompts are not re-checked.

        A prompt is a string (text) or a :class:`Prompt` (text, exemplar boxes or both). Boxes
        are pixel xyxy of the original image, with positive width and height, inside the image
        when ``image_size`` is given (None: everything but the bounds, for a caller that has not
        decoded the image yet; ``segment`` checks the bounds alone later). A prompt of negative
        boxes alone is refused: both references accept it, but with no text and no positive box
        it names nothing to find.
        """
        if isinstance(prompts, CheckedPrompts):
            if image_size is None or prompts.image_size == image_size or not prompts.has_boxes:
                return prompts
            self._check_bounds(prompts.items, image_size)
            return replace(prompts, image_size=image_size)
        given = prompt_list(prompts)
        # Texts first, with the tokenizer's own messages (count, length, characters, a non-string).
        texts = self.tokenizer.validate([p.model_text if isinstance(p, Prompt) else p for p in given])
        items = tuple(p if isinstance(p, Prompt) else Prompt(text=p) for p in given)
        if any(p.boxes for p in items) and not self.max_boxes:
            raise ExemplarsUnsupported(f"exemplar boxes cannot be served: {self.exemplars_unavailable}")
        for index, prompt in enumerate(items):
            where = f"prompt {index}"
            if prompt.text is None and not prompt.boxes:
                raise InvalidPrompt(f"{where}: a prompt needs a text, exemplar boxes or both")
            if len(prompt.boxes) > self.max_boxes:
                raise InvalidBox(f"{where}: {len(prompt.boxes)} boxes, this model takes at most {self.max_boxes}")
            if prompt.boxes and prompt.text is None and not any(b.positive for b in prompt.boxes):
                raise InvalidBox(f"{where}: negative boxes need a text prompt or a positive box")
            for b in prompt.boxes:
                if len(b.box) != 4 or not all(np.isfinite(v) for v in b.box):
                    raise InvalidBox(f"{where}: a box is four finite numbers x0,y0,x1,y1, got {b.box}")
                x0, y0, x1, y1 = b.box
                if not (x1 > x0 and y1 > y0):
                    raise InvalidBox(f"{where}: box {b.box} is degenerate (needs x1 > x0 and y1 > y0)")
        if image_size is not None:
            self._check_bounds(items, image_size)
        return CheckedPrompts(items=items, texts=texts, image_size=image_size)

    @staticmethod
    def _check_bounds(prompts: Sequence[Prompt], image_size: ImageSize) -> None:
        for index, prompt in enumerate(prompts):
            for b in prompt.boxes:
                x0, y0, x1, y1 = b.box
                if x0 < 0 or y0 < 0 or x1 > image_size.width or y1 > image_size.height:
                    raise InvalidBox(f"prompt {index}: box {b.box} is outside the "
                                     f"{image_size.width}x{image_size.height} image")

    def load_image(self, source: ImageSource, *, image_id: str | None = None) -> LoadedImage:
        """Decode with EXIF orientation under this pipeline's megapixel limit.

        ``image_id``: the bytes' sha256 when the caller already has it (not hashed again).
        """
        return load_image(source, max_megapixels=self.limits.max_megapixels, image_id=image_id)

    # ------------------------------------------------------------------ stages

    def encode_image(self, image: LoadedImage | ImageSource) -> ImageEmbedding:
        """Image-encoder outputs (FPN levels + geometry CLS) for one image, batch 1."""
        watch = _Stopwatch()
        if not isinstance(image, LoadedImage):
            with watch.stage("preprocess"):
                image = self.load_image(image)
        part = self.parts["image_encoder"]
        spec = part.spec.input(TensorNames.PIXEL_VALUES)
        with watch.stage("preprocess"):
            pixel_values = to_pixel_values(image.pixels, self.manifest.preprocessing).astype(
                spec.dtype, copy=False
            )
        with watch.stage("image_encoder"):
            outputs = part.run({spec.name: pixel_values})
        self.stage_calls["image_encoder"] += 1
        return ImageEmbedding(
            image_id=image.image_id,
            image_size=image.size,
            tensors=outputs,
            encoder_key=self.encoder_key,
            timings_ms=watch.rounded(),
        )

    def encode_text(self, prompts: Sequence[str]) -> TextEmbedding:
        """Text features and mask for N prompt texts (chunked only beyond the part's max batch)."""
        watch = _Stopwatch()
        with watch.stage("preprocess"):
            items = self.tokenizer.validate(prompts)
            input_ids, attention_mask = self.tokenizer.encode(items)
        part = self.parts["text_encoder"]
        ids_spec = part.spec.input(TensorNames.INPUT_IDS)
        mask_spec = part.spec.input(TensorNames.ATTENTION_MASK)
        features = []
        with watch.stage("text_encoder"):
            for start in range(0, len(items), part.max_batch):
                chunk = slice(start, start + part.max_batch)
                out = part.run(
                    {
                        ids_spec.name: input_ids[chunk].astype(ids_spec.dtype, copy=False),
                        mask_spec.name: attention_mask[chunk].astype(mask_spec.dtype, copy=False),
                    }
                )
                features.append(out[TensorNames.TEXT_FEATURES])
                self.stage_calls["text_encoder"] += 1
        # Stored under the decoder's input names, so the decoders are fed by name without a mapping.
        return TextEmbedding(
            prompts=tuple(items),
            tensors={
                TensorNames.TEXT_FEATURES: np.concatenate(features, axis=0),
                TensorNames.TEXT_MASK: attention_mask,
            },
            timings_ms=watch.rounded(),
        )

    def _text_for(self, prompts: CheckedPrompts) -> TextEmbedding:
        """The text rows of ``prompts``; box-only prompts reuse one encoding of "visual"."""
        if any(text != BOX_ONLY_TEXT for text in prompts.texts):
            return self.encode_text(prompts.texts)
        fresh = self._box_only_text is None
        if self._box_only_text is None:
            self._box_only_text = self.encode_text([BOX_ONLY_TEXT])
        one = self._box_only_text
        rows = {name: np.repeat(value, len(prompts), axis=0) for name, value in one.tensors.items()}
        return TextEmbedding(prompts=prompts.texts, tensors=rows, timings_ms=dict(one.timings_ms) if fresh else {})

    # ------------------------------------------------------------------ decoding

    def decoder_inputs(self, image_emb: ImageEmbedding, text_emb: TextEmbedding,
                       rows: Sequence[int] | None = None, extra: dict[str, np.ndarray] | None = None,
                       part: str = "decoder") -> dict[str, np.ndarray]:
        """A decoder's feed for prompt ``rows`` (default: all), by the manifest's input names and dtypes.

        Image tensors are batch 1 (the graph broadcasts them over the prompts); text rows and
        ``extra`` (the geometry encoder's tokens, already those rows) are per prompt.
        """
        rows = range(len(text_emb.prompts)) if rows is None else rows
        take = _rows(rows)
        feed: dict[str, np.ndarray] = {}
        for tensor in self.parts[part].spec.inputs:
            if tensor.name in image_emb.tensors:
                value = image_emb.tensors[tensor.name]
                if tensor.has_batch:  # a graph exported without the broadcast: repeat the image
                    value = np.repeat(value[:1], len(rows), axis=0)
            elif tensor.name in text_emb.tensors:
                value = text_emb.tensors[tensor.name][take]
            elif extra is not None and tensor.name in extra:
                value = extra[tensor.name]
            else:
                raise InvalidInput(f"{part} input {tensor.name!r} has no source")
            # Deliberate cast: the server may cache embeddings in fp16 to halve their bytes.
            feed[tensor.name] = np.ascontiguousarray(value, dtype=tensor.dtype)
        return feed

    def exemplar_inputs(self, prompts: Sequence[Prompt], image_size: ImageSize) -> dict[str, np.ndarray]:
        """Boxes as the geometry graph takes them: normalised cxcywh, padded to K with label -10.

        Normalised by the original image's size: the preprocessing resizes the whole image to
        the model's square input (no padding), so relative coordinates carry over unchanged.
        """
        spec = self.parts["geometry_encoder"].spec
        boxes = np.zeros((len(prompts), self.max_boxes, 4), dtype=spec.input(TensorNames.INPUT_BOXES).dtype)
        labels = np.full((len(prompts), self.max_boxes), -10,
                         dtype=spec.input(TensorNames.INPUT_BOXES_LABELS).dtype)
        width, height = image_size
        for row, prompt in enumerate(prompts):
            for col, b in enumerate(prompt.boxes):  # valid boxes first, padding after
                x0, y0, x1, y1 = b.box
                boxes[row, col] = ((x0 + x1) / 2 / width, (y0 + y1) / 2 / height,
                                   (x1 - x0) / width, (y1 - y0) / height)
                labels[row, col] = 1 if b.positive else 0
        return {TensorNames.INPUT_BOXES: boxes, TensorNames.INPUT_BOXES_LABELS: labels}

    def _run_text_rows(self, image_emb: ImageEmbedding, text_emb: TextEmbedding, prompts: CheckedPrompts,
                       rows: Sequence[int], watch: _Stopwatch) -> dict[str, np.ndarray]:
        """The decoder on text-only prompts: the image encoder's geometry CLS token stands for
        "no boxes", so these prompts skip the geometry graph."""
        with watch.stage("decoder"):
            out = self.parts["decoder"].run(self.decoder_inputs(image_emb, text_emb, rows))
        self.stage_calls["decoder"] += 1
        return out

    def _run_box_rows(self, image_emb: ImageEmbedding, text_emb: TextEmbedding, prompts: CheckedPrompts,
                      rows: Sequence[int], watch: _Stopwatch) -> dict[str, np.ndarray]:
        """Geometry encoder on the rows' boxes, then the exemplar decoder."""
        geometry = self.parts["geometry_encoder"]
        level = geometry.spec.input_names[0]  # the image level the boxes are pooled from
        boxes = self.exemplar_inputs([prompts[row] for row in rows], image_emb.image_size)
        with watch.stage("geometry_encoder"):
            tokens = geometry.run({
                level: np.ascontiguousarray(image_emb.tensors[level], dtype=geometry.spec.input(level).dtype),
                **boxes,
            })
        self.stage_calls["geometry_encoder"] += 1
        with watch.stage("decoder"):
            out = self.parts["exemplar_decoder"].run(
                self.decoder_inputs(image_emb, text_emb, rows, tokens, part="exemplar_decoder"))
        self.stage_calls["decoder"] += 1
        return out

    def _decode(self, image_emb: ImageEmbedding, text_emb: TextEmbedding, prompts: CheckedPrompts,
                options: SegmentOptions, watch: _Stopwatch) -> list[PromptResult]:
        """Detections per prompt, in ``prompts`` order: text-only prompts in one batched decoder
        call, prompts with boxes in one geometry + exemplar decoder call (each chunked only past
        its graphs' max batch). The image features go in once per call, batch 1."""
        if image_emb.encoder_key and image_emb.encoder_key != self.encoder_key:
            raise InvalidInput("this image embedding was computed by a different image encoder")
        if tuple(text_emb.prompts) != tuple(prompts.texts):
            raise InvalidInput(f"the text embedding holds prompts {list(text_emb.prompts)[:4]}, "
                               f"not those of this call {list(prompts.texts)[:4]}")
        results: list[PromptResult | None] = [None] * len(prompts)
        text_rows = [row for row, prompt in enumerate(prompts) if not prompt.boxes]
        box_rows = [row for row, prompt in enumerate(prompts) if prompt.boxes]
        paths = [(text_rows, self.parts["decoder"].max_batch, self._run_text_rows)]
        if box_rows:
            step = min(self.parts["geometry_encoder"].max_batch, self.parts["exemplar_decoder"].max_batch)
            paths.append((box_rows, step, self._run_box_rows))
        for rows, step, run in paths:
            for start in range(0, len(rows), step):
                chunk = rows[start:start + step]
                out = run(image_emb, text_emb, prompts, chunk, watch)
                # Each chunk is reduced to its kept detections (low-resolution masks) before the
                # next runs: a request holds one chunk of decoder outputs, not one per prompt.
                with watch.stage("postprocess"):
                    for i, row in enumerate(chunk):
                        detections = postprocess(
                            out[TensorNames.PRED_MASKS][i],
                            out[TensorNames.PRED_BOXES][i],
                            out[TensorNames.PRED_LOGITS][i],
                            float(np.asarray(out[TensorNames.PRESENCE_LOGITS][i]).reshape(-1)[0]),
                            image_emb.image_size.shape,
                            options,
                        )
                        results[row] = PromptResult(prompt=prompts[row].name, detections=detections)
                del out
        return [result for result in results if result is not None]

    # ------------------------------------------------------------------ one call

    def segment(
        self,
        image: ImageEmbedding | LoadedImage | ImageSource,
        prompts: Sequence[str | Prompt] | CheckedPrompts,
        options: SegmentOptions | None = None,
        *,
        text: TextEmbedding | None = None,
    ) -> SegmentResult:
        """Image + prompts (text, exemplar boxes, or both, in any mix) -> :class:`SegmentResult`.

        Cheap checks run first (options, prompts; box bounds once the image size is known), so
        bad input costs no encoder time. ``image`` may be an :class:`ImageEmbedding` and
        ``text`` the prompts' :class:`TextEmbedding` (rows in ``prompts`` order), computed or
        cached earlier: those stages are not run and count 0 ms in ``timings_ms``, which holds
        every stage of :data:`STAGES` and "total".
        """
        started = time.perf_counter()
        chosen = self.check_options(options)
        watch = _Stopwatch()
        checked = self.check_prompts(prompts)  # checks are no stage: they count in "total" only
        cache_hit = isinstance(image, ImageEmbedding)
        if not isinstance(image, (ImageEmbedding, LoadedImage)):
            with watch.stage("preprocess"):
                image = self.load_image(image)
        checked = self.check_prompts(checked, image.image_size if isinstance(image, ImageEmbedding) else image.size)
        if text is None:
            text = self._text_for(checked)
            watch.merge(text.timings_ms)
        if isinstance(image, ImageEmbedding):
            image_emb = image
        else:
            image_emb = self.encode_image(image)
            watch.merge(image_emb.timings_ms)
        results = self._decode(image_emb, text, checked, chosen, watch)
        timings = add_timings(watch.ms)
        timings["total"] = (time.perf_counter() - started) * 1000.0
        return SegmentResult(
            image_id=image_emb.image_id,
            image_size=image_emb.image_size,
            results=results,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            cache_hit=cache_hit,
            extra={"backend": self.backend.kind, "precision": self.backend.precision},
        )


def _rows(rows: Sequence[int]) -> slice | list[int]:
    """``rows`` as an index: a slice (a view) when they are consecutive, as in a text-only call."""
    rows = list(rows)
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return rows
