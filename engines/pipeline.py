"""``Sam3Pipeline``: image + prompts -> per-prompt detections, on any backend, without torch.

The shape follows nanoowl's ``OwlPredictor``: ``encode_image`` and ``encode_text`` return
small dataclasses the server caches (:class:`~engines.types.ImageEmbedding`,
:class:`~engines.types.TextEmbedding`), and ``decode`` combines them. ``segment`` is the
one-call convenience the CLI uses.

Every size, name and dtype comes from the bundle manifest, so a SAM3-Small or LoRA bundle
runs through the same code as full SAM3.

Thread-safety: a pipeline is driven by one thread at a time (the server's single inference
worker). The counters and timings below are plain attributes, not locked.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from engines.backend import Backend, PartRunner, open_backend
from engines.bundle import PART_NAMES, Bundle, TensorNames
from engines.errors import BundleError, InvalidInput, InvalidOption
from engines.postprocess import postprocess
from engines.preprocess import DEFAULT_MAX_MEGAPIXELS, ImageSource, load_image, to_pixel_values
from engines.tokenizer import DEFAULT_MAX_CHARS, PromptTokenizer
from engines.types import ImageEmbedding, LoadedImage, PromptResult, SegmentResult, TextEmbedding

DEFAULT_MAX_PROMPTS = 16
STAGES = ("preprocess", "image_encoder", "text_encoder", "decoder", "postprocess")


class Sam3Pipeline:
    """Preprocess -> image encoder / text encoder -> one batched decoder call -> postprocess."""

    def __init__(
        self,
        bundle: Bundle,
        backend: Backend,
        *,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
        max_prompts: int = DEFAULT_MAX_PROMPTS,
        max_prompt_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        if max_prompts < 1 or max_prompt_chars < 1 or max_megapixels <= 0:
            raise InvalidOption("max_prompts, max_prompt_chars and max_megapixels must be positive")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.backend = backend
        self.max_megapixels = float(max_megapixels)
        self.max_prompts = int(max_prompts)
        self.max_prompt_chars = int(max_prompt_chars)
        self.tokenizer = PromptTokenizer.from_bundle(
            bundle, max_chars=max_prompt_chars, max_prompts=max_prompts
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
        # Keyed by weights, not by the ONNX file: LoRA bundles that only touch the decoder share
        # the image encoder, so they can share the server's embedding cache.
        self.encoder_key = image_part.weights_sha256 or image_part.sha256
        self.text_encoder_key = (
            f"{text_part.weights_sha256 or text_part.sha256}:{self.tokenizer.tokenizer_hash}"
        )
        self.stage_calls: Counter[str] = Counter()
        self.last_timings_ms: dict[str, float] = {}

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_bundle(
        cls,
        path: str | Path | Bundle,
        backend: str = "auto",
        *,
        max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
        max_prompts: int = DEFAULT_MAX_PROMPTS,
        max_prompt_chars: int = DEFAULT_MAX_CHARS,
        **backend_options: Any,
    ) -> "Sam3Pipeline":
        """Open a bundle directory and a backend (``auto``, ``onnxruntime`` or ``tensorrt``)."""
        bundle = path if isinstance(path, Bundle) else Bundle(path)
        engine = open_backend(bundle, backend, **backend_options)
        try:
            return cls(
                bundle,
                engine,
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
                "max_megapixels": self.max_megapixels,
                "max_prompts": self.max_prompts,
                "max_prompt_chars": self.max_prompt_chars,
            },
            "encoder_key": self.encoder_key,
        }

    # ------------------------------------------------------------------ stages

    def load_image(self, source: ImageSource) -> LoadedImage:
        """Decode with EXIF orientation under this pipeline's megapixel limit."""
        with self._timed("preprocess"):
            return load_image(source, max_megapixels=self.max_megapixels)

    def encode_image(self, image: LoadedImage | ImageSource) -> ImageEmbedding:
        """Image-encoder outputs (FPN levels + geometry CLS) for one image, batch 1."""
        if not isinstance(image, LoadedImage):
            image = self.load_image(image)
        part = self.parts["image_encoder"]
        spec = part.spec.input(TensorNames.PIXEL_VALUES)
        with self._timed("preprocess"):
            pixel_values = to_pixel_values(image.pixels, self.manifest.preprocessing).astype(
                spec.dtype, copy=False
            )
        with self._timed("image_encoder"):
            outputs = part.run({spec.name: pixel_values})
        self.stage_calls["image_encoder"] += 1
        return ImageEmbedding(
            image_id=image.image_id,
            original_size=(image.height, image.width),
            tensors=outputs,
            encoder_key=self.encoder_key,
        )

    def encode_text(self, prompts: Sequence[str]) -> TextEmbedding:
        """Text features and mask for N prompts (chunked only beyond the part's max batch)."""
        with self._timed("preprocess"):
            items = self.tokenizer.validate(prompts)
            input_ids, attention_mask = self.tokenizer.encode(items)
        part = self.parts["text_encoder"]
        ids_spec = part.spec.input(TensorNames.INPUT_IDS)
        mask_spec = part.spec.input(TensorNames.ATTENTION_MASK)
        features = []
        with self._timed("text_encoder"):
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
        )

    def decode(
        self,
        image_emb: ImageEmbedding,
        text_emb: TextEmbedding,
        *,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        max_detections: int | None = None,
        with_masks: bool = True,
    ) -> list[PromptResult]:
        """Detections per prompt: all prompts in ONE decoder call (chunked only past max batch).

        The decoder graph takes the image features with batch 1 and broadcasts them over the
        prompt batch, so N prompts cost one image-feature upload and one launch, not N.
        """
        _check_options(score_threshold, mask_threshold, max_detections)
        if image_emb.encoder_key and image_emb.encoder_key != self.encoder_key:
            raise InvalidInput("this image embedding was computed by a different image encoder")
        count = len(text_emb.prompts)
        if count == 0:
            raise InvalidInput("the text embedding holds no prompts")
        part = self.parts["decoder"]
        outputs: dict[str, list[np.ndarray]] = {name: [] for name in part.spec.output_names}
        with self._timed("decoder"):
            for start in range(0, count, part.max_batch):
                stop = min(start + part.max_batch, count)
                feed = self._decoder_feed(image_emb, text_emb, start, stop)
                for name, value in part.run(feed).items():
                    outputs[name].append(value)
                self.stage_calls["decoder"] += 1
        merged = {name: np.concatenate(chunks, axis=0) for name, chunks in outputs.items()}
        results = []
        with self._timed("postprocess"):
            for i, prompt in enumerate(text_emb.prompts):
                detections = postprocess(
                    merged[TensorNames.PRED_MASKS][i],
                    merged[TensorNames.PRED_BOXES][i],
                    merged[TensorNames.PRED_LOGITS][i],
                    float(np.asarray(merged[TensorNames.PRESENCE_LOGITS][i]).reshape(-1)[0]),
                    original_size=image_emb.original_size,
                    score_threshold=score_threshold,
                    mask_threshold=mask_threshold,
                    max_detections=max_detections,
                    with_masks=with_masks,
                )
                results.append(PromptResult(prompt=prompt, detections=tuple(detections)))
        return results

    def _decoder_feed(
        self, image_emb: ImageEmbedding, text_emb: TextEmbedding, start: int, stop: int
    ) -> dict[str, np.ndarray]:
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
        *,
        score_threshold: float = 0.5,
        mask_threshold: float = 0.5,
        max_detections: int | None = None,
        with_masks: bool = True,
    ) -> SegmentResult:
        """Image + prompts -> :class:`SegmentResult` with per-stage ``timings_ms``.

        Cheap checks run first (options, prompts), so bad input costs no encoder time.
        ``image`` may be an :class:`ImageEmbedding` (a cache hit: no image encoder run).
        """
        started = time.perf_counter()
        self.last_timings_ms = {stage: 0.0 for stage in STAGES}
        _check_options(score_threshold, mask_threshold, max_detections)
        if not isinstance(prompts, TextEmbedding):
            prompts = self.tokenizer.validate(prompts)
        cache_hit = isinstance(image, ImageEmbedding)
        if not isinstance(image, (ImageEmbedding, LoadedImage)):
            image = self.load_image(image)
        text_emb = prompts if isinstance(prompts, TextEmbedding) else self.encode_text(prompts)
        image_emb = image if isinstance(image, ImageEmbedding) else self.encode_image(image)
        results = self.decode(
            image_emb,
            text_emb,
            score_threshold=score_threshold,
            mask_threshold=mask_threshold,
            max_detections=max_detections,
            with_masks=with_masks,
        )
        timings = dict(self.last_timings_ms)
        timings["total"] = (time.perf_counter() - started) * 1000.0
        height, width = image_emb.original_size
        return SegmentResult(
            image_id=image_emb.image_id,
            image_size=(width, height),
            results=results,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            cache_hit=cache_hit,
            extra={"backend": self.backend.kind, "precision": self.backend.precision},
        )

    @contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            elapsed = (time.perf_counter() - started) * 1000.0
            self.last_timings_ms[stage] = self.last_timings_ms.get(stage, 0.0) + elapsed


def _check_options(score_threshold: float, mask_threshold: float, max_detections: int | None) -> None:
    for name, value in (("score_threshold", score_threshold), ("mask_threshold", mask_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise InvalidOption(f"{name} must be a number in [0, 1], got {value!r}")
    if max_detections is not None and (
        isinstance(max_detections, bool) or not isinstance(max_detections, int) or max_detections < 0
    ):
        raise InvalidOption(f"max_detections must be a non-negative integer or None, got {max_detections!r}")
