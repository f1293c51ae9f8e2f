"""What a request does, minus HTTP: cache lookups, the worker job, postprocessing.

Routes parse and shape; this module decides where each step runs:
- hashing and image decoding run in the thread pool (CPU work, not the GPU thread's business);
  a cache hit on the image's sha256 skips decoding entirely;
- encode_image / encode_text / decode run as ONE job on the inference worker (GPU-bound);
- mask encoding (RLE/PNG/polygon) runs in the thread pool again, so the worker is free for
  the next job while masks are compressed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
from anyio import to_thread

from engines.bundle import sha256_bytes
from engines.postprocess import result_document
from engines.preprocess import decode_image_bytes
from engines.errors import InvalidImage, InvalidOption
from engines.types import ImageEmbedding, LoadedImage, PromptResult, TextEmbedding
from server.cache import EmbeddingCache, TextCache
from server.errors import ImageNotCached, NotReady, PayloadTooLarge
from server.loading import backend_identity
from server.metrics import Metrics
from server.settings import Settings
from server.worker import InferenceWorker

STAGES = ("queue", "image_encoder", "text_encoder", "decoder", "postprocess", "total")


@dataclass(frozen=True)
class SegmentOptions:
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_detections: int = 100
    mask_format: str = "rle"


@dataclass
class _Encoded:
    embedding: ImageEmbedding
    image_hit: bool
    results: list[PromptResult] | None
    timings: dict[str, float]


class _Evicted(Exception):
    """The embedding was cached when checked but evicted before the job ran: decode and retry."""


class SegmentService:
    """Glue between the HTTP layer, the caches and the single inference worker."""

    def __init__(
        self,
        settings: Settings,
        worker: InferenceWorker[Any],
        image_cache: EmbeddingCache[ImageEmbedding],
        text_cache: TextCache[TextEmbedding],
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.image_cache = image_cache
        self.text_cache = text_cache
        self.metrics = metrics

    # -- identity ---------------------------------------------------------------------------
    @property
    def pipeline(self) -> Any:
        return self.worker.pipeline

    @property
    def encoder_key(self) -> str:
        return str(self.pipeline.encoder_key)  # Sam3Pipeline derives it from the manifest

    def cache_key(self, image_id: str) -> tuple[str, str]:
        return (image_id, self.encoder_key)

    # -- validation (before any queueing) ----------------------------------------------------
    def check_prompts(self, prompts: Sequence[str]) -> tuple[str, ...]:
        """The pipeline's own prompt validation (its limits are these settings), run here in the
        event loop so a bad prompt is refused before it takes a queue slot."""
        if self.pipeline is None:
            raise NotReady(f"inference engines are not ready (state: {self.worker.state})")
        return tuple(self.pipeline.tokenizer.validate(prompts))

    def check_options(self, options: SegmentOptions) -> None:
        if not (0.0 <= options.score_threshold <= 1.0):
            raise InvalidOption("score_threshold must be within [0, 1]")
        if not (0.0 <= options.mask_threshold <= 1.0):
            raise InvalidOption("mask_threshold must be within [0, 1]")
        if not (1 <= options.max_detections <= self.settings.max_detections):
            raise InvalidOption(f"max_detections must be within [1, {self.settings.max_detections}]")
        if options.mask_format not in ("rle", "png", "polygon", "none"):
            raise InvalidOption("mask_format must be one of rle, png, polygon, none")

    def check_image_size(self, data: bytes) -> None:
        if not data:
            raise InvalidImage("the image is empty (0 bytes)")
        if len(data) > self.settings.max_upload_bytes:
            raise PayloadTooLarge(
                f"image of {len(data)} bytes; at most {self.settings.max_upload_bytes} bytes"
            )

    # -- operations --------------------------------------------------------------------------
    async def embed(self, data: bytes) -> dict[str, Any]:
        """Encode (or find) an image's embedding; the result is what POST /embed returns."""
        self.check_image_size(data)
        encoded = await self._encode(data, None, prompts=None, options=None)
        height, width = encoded.embedding.original_size
        return {
            "image_id": encoded.embedding.image_id,
            "image_size": {"width": int(width), "height": int(height)},
            "cached": encoded.image_hit,
        }

    async def segment(
        self,
        *,
        data: bytes | None,
        image_id: str | None,
        prompts: Sequence[str],
        options: SegmentOptions,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        clean = self.check_prompts(prompts)
        self.check_options(options)
        if data is not None:
            self.check_image_size(data)
        encoded = await self._encode(data, image_id, prompts=clean, options=options)
        t_post = time.perf_counter()
        height, width = encoded.embedding.original_size
        assert encoded.results is not None
        document = await to_thread.run_sync(
            lambda: result_document(image_size=(int(width), int(height)), results=encoded.results,
                                    mask_format=options.mask_format)
        )
        timings = dict(encoded.timings)
        timings["postprocess"] = (time.perf_counter() - t_post) * 1e3
        timings["total"] = (time.perf_counter() - t0) * 1e3
        for stage, ms in timings.items():
            self.metrics.observe_stage(stage, ms / 1e3)
        body: dict[str, Any] = {
            "image_id": encoded.embedding.image_id,
            "image_size": {"width": int(width), "height": int(height)},
            "cache_hit": encoded.image_hit,
        }
        body.update({k: v for k, v in document.items() if k not in body})
        body["timings_ms"] = {stage: round(float(timings.get(stage, 0.0)), 3) for stage in STAGES}
        body["model"] = self.model_info()
        return body

    def delete(self, image_id: str) -> None:
        if not self.image_cache.delete(self.cache_key(image_id)):
            raise ImageNotCached(f"image {image_id} is not cached")

    def model_info(self) -> dict[str, str]:
        pipeline = self.pipeline
        if pipeline is None:
            return {"name": "", "backend": "", "precision": ""}
        backend, precision = backend_identity(pipeline)
        return {"name": str(pipeline.manifest.name), "backend": backend, "precision": precision}

    def cache_dtype(self) -> str:
        """The dtype embeddings are stored in (see Settings.cache_dtype)."""
        if self.settings.cache_dtype != "auto":
            return self.settings.cache_dtype
        _, precision = backend_identity(self.pipeline)
        return "float16" if precision == "fp16" else "float32"

    def _cacheable(self, embedding: ImageEmbedding) -> ImageEmbedding:
        """The embedding as cached. Every request, the first included, decodes from this form,
        so a cold and a warm answer for the same image are identical."""
        dtype = np.dtype(self.cache_dtype())
        if all(t.dtype == dtype for t in embedding.tensors.values()):
            return embedding
        return replace(embedding, tensors={k: v.astype(dtype) for k, v in embedding.tensors.items()})

    # -- internals ---------------------------------------------------------------------------
    def _load_image(self, data: bytes, image_id: str) -> LoadedImage:
        """Decode in the thread pool with the pipeline's limits, not through the pipeline object:
        the pipeline's own timers are per-thread state owned by the inference worker."""
        return decode_image_bytes(data, max_megapixels=self.settings.max_megapixels, image_id=image_id)

    async def _encode(
        self,
        data: bytes | None,
        image_id: str | None,
        *,
        prompts: tuple[str, ...] | None,
        options: SegmentOptions | None,
    ) -> _Encoded:
        # Readiness first: hashing or decoding for a server that cannot run is wasted work.
        if self.pipeline is None or self.worker.state != "ready":
            raise NotReady(f"inference engines are not ready (state: {self.worker.state})")
        loaded: LoadedImage | None = None
        if data is not None:
            image_id = await to_thread.run_sync(sha256_bytes, data)
            if self.cache_key(image_id) not in self.image_cache:
                loaded = await to_thread.run_sync(self._load_image, data, image_id)
        assert image_id is not None
        key = self.cache_key(image_id)
        for _ in range(2):
            job = self._job(key, loaded, prompts, options, from_bytes=data is not None)
            try:
                result = await self.worker.run(job, timeout_s=self.settings.request_timeout_s)
            except _Evicted:
                loaded = await to_thread.run_sync(self._load_image, data, image_id)
                continue
            encoded = result.value
            encoded.timings["queue"] = result.queue_ms
            return encoded
        raise ImageNotCached(f"image {image_id} is not cached")  # pragma: no cover - two evictions

    def _job(
        self,
        key: tuple[str, str],
        loaded: LoadedImage | None,
        prompts: tuple[str, ...] | None,
        options: SegmentOptions | None,
        from_bytes: bool,
    ):
        image_cache, text_cache = self.image_cache, self.text_cache

        def job(pipeline: Any) -> _Encoded:
            timings: dict[str, float] = {}
            t = time.perf_counter()
            if loaded is not None:
                embedding, hit = image_cache.get_or_compute(
                    key, lambda: self._cacheable(pipeline.encode_image(loaded)))
            else:
                embedding = image_cache.get(key)
                if embedding is None:
                    if from_bytes:
                        raise _Evicted()
                    raise ImageNotCached(f"image {key[0]} is not cached; send the image again")
                hit = True
            timings["image_encoder"] = (time.perf_counter() - t) * 1e3
            if prompts is None or options is None:
                return _Encoded(embedding, hit, None, timings)
            t = time.perf_counter()
            text = _text_embedding(pipeline, text_cache, prompts)
            timings["text_encoder"] = (time.perf_counter() - t) * 1e3
            t = time.perf_counter()
            results = pipeline.decode(
                embedding,
                text,
                score_threshold=options.score_threshold,
                mask_threshold=options.mask_threshold,
                max_detections=options.max_detections,
                with_masks=options.mask_format != "none",
            )
            timings["decoder"] = (time.perf_counter() - t) * 1e3
            return _Encoded(embedding, hit, list(results), timings)

        return job


def _text_embedding(pipeline: Any, cache: TextCache[TextEmbedding], prompts: tuple[str, ...]) -> TextEmbedding:
    """Per-prompt cached text embeddings, missing ones encoded in one batched call."""
    found: dict[str, TextEmbedding] = {}
    missing: list[str] = []
    for prompt in dict.fromkeys(prompts):
        cached = cache.get(prompt)
        if cached is None:
            missing.append(prompt)
        else:
            found[prompt] = cached
    if missing:
        fresh = pipeline.encode_text(missing)
        for i, prompt in enumerate(missing):
            row = TextEmbedding(
                prompts=(prompt,), tensors={k: np.ascontiguousarray(v[i : i + 1]) for k, v in fresh.tensors.items()}
            )
            cache.put(prompt, row)
            found[prompt] = row
    rows = [found[p] for p in prompts]
    if len(rows) == 1:
        return rows[0]
    names = rows[0].tensors.keys()
    return TextEmbedding(
        prompts=tuple(prompts), tensors={k: np.concatenate([r.tensors[k] for r in rows], axis=0) for k in names}
    )

