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
from engines.errors import BundleError, EngineError, ExemplarsUnsupported, InvalidBox, InvalidInput
from engines.factory import open_backend
from engines.options import Limits, SegmentOptions
from engines.postprocess import postprocess
from engines.preprocess import ImageSource, load_image, to_pixel_values
from engines.tokenizer import PromptTokenizer
from engines.types import (
    BOX_ONLY_TEXT,
    STAGES,
    ExemplarPrompt,
    ImageEmbedding,
    ImageSize,
    LoadedImage,
    PromptResult,
    Prompts,
    SegmentResult,
    TextEmbedding,
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
        """What /info and the CLI show: model, backend, limits."""
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

    def segment_options(
        self,
        options: SegmentOptions | None = None,
        *,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        max_detections: int | None = None,
        with_masks: bool | None = None,
    ) -> SegmentOptions:
        """One call's options (``options`` and/or keywords) under this pipeline's limits."""
        return SegmentOptions.of(
            options, score_threshold=score_threshold, mask_threshold=mask_threshold,
            max_detections=max_detections, with_masks=with_masks,
        ).within(self.limits)  # fmt: skip

    def check_prompts(self, prompts: Sequence[str]) -> Prompts:
        """Typed errors for prompts this pipeline would refuse; checked prompts are not re-checked."""
        return self.tokenizer.validate(prompts)

    def check_exemplars(self, prompts: Sequence[ExemplarPrompt],
                        image_size: ImageSize | None) -> tuple[ExemplarPrompt, ...]:
        """Typed errors for exemplar prompts this pipeline would refuse on an image of ``image_size``.

        Boxes are pixel xyxy of the original image and must lie inside it, with positive width
        and height. A prompt of negative boxes alone is refused: both references accept it, but
        with no text and no positive box it names nothing to find. ``image_size`` None checks
        everything but the bounds (a server before it has decoded the image).
        """
        prompts = tuple(prompts)
        if any(p.boxes for p in prompts) and not self.max_boxes:
            raise ExemplarsUnsupported(f"exemplar boxes cannot be served: {self.exemplars_unavailable}")
        self.check_prompts([p.model_text for p in prompts])
        for index, prompt in enumerate(prompts):
            where = f"prompt {index}"
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
                if image_size is not None and (x0 < 0 or y0 < 0 or x1 > image_size.width or y1 > image_size.height):
                    raise InvalidBox(f"{where}: box {b.box} is outside the {image_size.width}x{image_size.height} image")
        return prompts

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
        """Text features and mask for N prompts (chunked only beyond the part's max batch)."""
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
        # Stored under the decoder's input names, so decode() feeds it by name without a mapping.
        return TextEmbedding(
            prompts=tuple(items),
            tensors={
                TensorNames.TEXT_FEATURES: np.concatenate(features, axis=0),
                TensorNames.TEXT_MASK: attention_mask,
            },
            timings_ms=watch.rounded(),
        )

    def decode(
        self,
        image_emb: ImageEmbedding,
        text_emb: TextEmbedding,
        options: SegmentOptions | None = None,
        *,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        max_detections: int | None = None,
        with_masks: bool | None = None,
    ) -> list[PromptResult]:
        """Detections per prompt: all prompts in ONE decoder call (chunked only past max batch).

        The decoder graph takes the image features with batch 1 and broadcasts them over the
        prompt batch, so N prompts cost one image-feature upload and one launch, not N.
        ``segment`` with the two embeddings does the same and also returns the stage timings.
        """
        chosen = self.segment_options(
            options, score_threshold=score_threshold, mask_threshold=mask_threshold,
            max_detections=max_detections, with_masks=with_masks,
        )  # fmt: skip
        return self._decode(image_emb, text_emb, chosen, _Stopwatch())

    def _decode(
        self, image_emb: ImageEmbedding, text_emb: TextEmbedding, options: SegmentOptions, watch: _Stopwatch
    ) -> list[PromptResult]:
        if image_emb.encoder_key and image_emb.encoder_key != self.encoder_key:
            raise InvalidInput("this image embedding was computed by a different image encoder")
        count = len(text_emb.prompts)
        if count == 0:
            raise InvalidInput("the text embedding holds no prompts")
        part = self.parts["decoder"]
        results = []
        for start in range(0, count, part.max_batch):
            stop = min(start + part.max_batch, count)
            with watch.stage("decoder"):
                out = part.run(self.decoder_inputs(image_emb, text_emb, start, stop))
            self.stage_calls["decoder"] += 1
            # Each chunk is reduced to its kept detections (low-resolution masks) before the next
            # runs: a request holds one chunk of decoder outputs, not one per prompt.
            with watch.stage("postprocess"):
                for i in range(stop - start):
                    detections = postprocess(
                        out[TensorNames.PRED_MASKS][i],
                        out[TensorNames.PRED_BOXES][i],
                        out[TensorNames.PRED_LOGITS][i],
                        float(np.asarray(out[TensorNames.PRESENCE_LOGITS][i]).reshape(-1)[0]),
                        image_emb.image_size.shape,
                        options,
                    )
                    results.append(PromptResult(prompt=text_emb.prompts[start + i], detections=tuple(detections)))
            del out
        return results

    @staticmethod
    def _results(out: dict[str, np.ndarray], names: Sequence[str], image_emb: ImageEmbedding,
                 options: SegmentOptions) -> list[PromptResult]:
        results = []
        for i, name in enumerate(names):
            detections = postprocess(
                out[TensorNames.PRED_MASKS][i],
                out[TensorNames.PRED_BOXES][i],
                out[TensorNames.PRED_LOGITS][i],
                float(np.asarray(out[TensorNames.PRESENCE_LOGITS][i]).reshape(-1)[0]),
                image_emb.image_size.shape,
                options,
            )
            results.append(PromptResult(prompt=name, detections=tuple(detections)))
        return results

    def exemplar_inputs(self, prompts: Sequence[ExemplarPrompt], image_size: ImageSize) -> dict[str, np.ndarray]:
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

    def _decode_exemplars(self, image_emb: ImageEmbedding, text_emb: TextEmbedding,
                          prompts: Sequence[ExemplarPrompt], options: SegmentOptions,
                          watch: _Stopwatch) -> list[PromptResult]:
        if image_emb.encoder_key and image_emb.encoder_key != self.encoder_key:
            raise InvalidInput("this image embedding was computed by a different image encoder")
        geometry = self.parts["geometry_encoder"]
        decoder = self.parts["exemplar_decoder"]
        boxes = self.exemplar_inputs(prompts, image_emb.image_size)
        level = geometry.spec.input_names[0]  # the image level the boxes are pooled from
        results = []
        step = min(geometry.max_batch, decoder.max_batch)
        for start in range(0, len(prompts), step):
            stop = min(start + step, len(prompts))
            with watch.stage("geometry_encoder"):
                tokens = geometry.run({
                    level: np.ascontiguousarray(image_emb.tensors[level],
                                                dtype=geometry.spec.input(level).dtype),
                    **{name: value[start:stop] for name, value in boxes.items()},
                })
            self.stage_calls["geometry_encoder"] += 1
            feed: dict[str, np.ndarray] = {}
            for tensor in decoder.spec.inputs:
                if tensor.name in image_emb.tensors:
                    value = image_emb.tensors[tensor.name]
                elif tensor.name in text_emb.tensors:
                    value = text_emb.tensors[tensor.name][start:stop]
                elif tensor.name in tokens:
                    value = tokens[tensor.name]
                else:
                    raise InvalidInput(f"exemplar decoder input {tensor.name!r} has no source")
                feed[tensor.name] = np.ascontiguousarray(value, dtype=tensor.dtype)
            with watch.stage("decoder"):
                out = decoder.run(feed)
            self.stage_calls["decoder"] += 1
            with watch.stage("postprocess"):
                results.extend(self._results(out, [p.name for p in prompts[start:stop]], image_emb, options))
            del out
        return results

    def decoder_inputs(
        self, image_emb: ImageEmbedding, text_emb: TextEmbedding, start: int = 0, stop: int | None = None
    ) -> dict[str, np.ndarray]:
        """The decoder's feed for prompts ``start:stop``, by the manifest's input names and dtypes."""
        stop = len(text_emb.prompts) if stop is None else stop
        feed: dict[str, np.ndarray] = {}
        for tensor in self.parts["decoder"].spec.inputs:
            if tensor.name in image_emb.tensors:
                value = image_emb.tensors[tensor.name]
                if tensor.has_batch:  # a graph exported without the broadcast: repeat the image
                    value = np.repeat(value[:1], stop - start, axis=0)
            elif tensor.name in text_emb.tensors:
                value = text_emb.tensors[tensor.name][start:stop]
            else:
                raise InvalidInput(
                    f"decoder input {tensor.name!r} is in neither the image nor the text embedding"
                )
            # Deliberate cast: the server may cache embeddings in fp16 to halve their bytes.
            feed[tensor.name] = np.ascontiguousarray(value, dtype=tensor.dtype)
        return feed

    # ------------------------------------------------------------------ one call

    def segment(
        self,
        image: ImageEmbedding | LoadedImage | ImageSource,
        prompts: TextEmbedding | Sequence[str],
        options: SegmentOptions | None = None,
        *,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        max_detections: int | None = None,
        with_masks: bool | None = None,
    ) -> SegmentResult:
        """Image + prompts -> :class:`SegmentResult` with the ``timings_ms`` of what this call ran.

        Cheap checks run first (options, prompts), so bad input costs no encoder time.
        ``image`` may be an :class:`ImageEmbedding` and ``prompts`` a :class:`TextEmbedding`
        (computed or cached earlier): those stages are not run and count 0 ms here.
        """
        started = time.perf_counter()
        chosen = self.segment_options(
            options, score_threshold=score_threshold, mask_threshold=mask_threshold,
            max_detections=max_detections, with_masks=with_masks,
        )  # fmt: skip
        watch = _Stopwatch()
        if not isinstance(prompts, TextEmbedding):
            with watch.stage("preprocess"):
                prompts = self.check_prompts(prompts)
        cache_hit = isinstance(image, ImageEmbedding)
        if not isinstance(image, (ImageEmbedding, LoadedImage)):
            with watch.stage("preprocess"):
                image = self.load_image(image)
        if isinstance(prompts, TextEmbedding):
            text_emb = prompts
        else:
            text_emb = self.encode_text(prompts)
            watch.merge(text_emb.timings_ms)
        if isinstance(image, ImageEmbedding):
            image_emb = image
        else:
            image_emb = self.encode_image(image)
            watch.merge(image_emb.timings_ms)
        results = self._decode(image_emb, text_emb, chosen, watch)
        timings = {stage: 0.0 for stage in STAGES}
        timings.update(watch.ms)
        timings["total"] = (time.perf_counter() - started) * 1000.0
        return SegmentResult(
            image_id=image_emb.image_id,
            image_size=image_emb.image_size,
            results=results,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            cache_hit=cache_hit,
            extra={"backend": self.backend.kind, "precision": self.backend.precision},
        )

    def segment_exemplars(
        self,
        image: ImageEmbedding | LoadedImage | ImageSource,
        prompts: Sequence[ExemplarPrompt],
        options: SegmentOptions | None = None,
        *,
        text: TextEmbedding | None = None,
        score_threshold: float | None = None,
        mask_threshold: float | None = None,
        max_detections: int | None = None,
        with_masks: bool | None = None,
    ) -> SegmentResult:
        """Image + prompts of text and/or exemplar boxes -> :class:`SegmentResult`.

        On a cached :class:`ImageEmbedding` a new box costs the geometry encoder and the
        exemplar decoder only: box-only prompts reuse one encoding of "visual", and prompts with
        text may bring their ``text`` embedding (rows in ``prompts`` order) from a cache.
        """
        started = time.perf_counter()
        chosen = self.segment_options(
            options, score_threshold=score_threshold, mask_threshold=mask_threshold,
            max_detections=max_detections, with_masks=with_masks,
        )  # fmt: skip
        watch = _Stopwatch()
        prompts = tuple(prompts)
        if not any(p.boxes for p in prompts):
            # no boxes: the text path (cached CLS token) gives the same answer, faster
            return self.segment(image, text if text is not None else [p.model_text for p in prompts], chosen)
        cache_hit = isinstance(image, ImageEmbedding)
        if not isinstance(image, (ImageEmbedding, LoadedImage)):
            with watch.stage("preprocess"):
                image = self.load_image(image)
        with watch.stage("preprocess"):
            prompts = self.check_exemplars(prompts, image.image_size if cache_hit else image.size)
        if text is None:
            text = self._exemplar_text(prompts)
            watch.merge(text.timings_ms)
        elif len(text.prompts) != len(prompts):
            raise InvalidInput(f"the text embedding holds {len(text.prompts)} prompts, not {len(prompts)}")
        if isinstance(image, ImageEmbedding):
            image_emb = image
        else:
            image_emb = self.encode_image(image)
            watch.merge(image_emb.timings_ms)
        results = self._decode_exemplars(image_emb, text, prompts, chosen, watch)
        timings = {stage: 0.0 for stage in STAGES}
        timings.update(watch.ms)
        timings["total"] = (time.perf_counter() - started) * 1000.0
        return SegmentResult(
            image_id=image_emb.image_id,
            image_size=image_emb.image_size,
            results=results,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            cache_hit=cache_hit,
            extra={"backend": self.backend.kind, "precision": self.backend.precision},
        )

    def _exemplar_text(self, prompts: Sequence[ExemplarPrompt]) -> TextEmbedding:
        if all(p.text is None for p in prompts):
            if self._box_only_text is None:
                self._box_only_text = self.encode_text([BOX_ONLY_TEXT])
                watch_ms = self._box_only_text.timings_ms
            else:
                watch_ms = {}
            one = self._box_only_text
            rows = {name: np.repeat(value, len(prompts), axis=0) for name, value in one.tensors.items()}
            return TextEmbedding(prompts=tuple(BOX_ONLY_TEXT for _ in prompts), tensors=rows, timings_ms=watch_ms)
        return self.encode_text([p.model_text for p in prompts])
