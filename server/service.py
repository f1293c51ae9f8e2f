"""What a request does, minus HTTP: cache lookups, the worker job, postprocessing.

Routes parse and shape; this module decides where each step runs, and bounds what it holds:
- admission first (:meth:`SegmentService.admit`, taken by server/middleware.py): a request
  takes one of ``SAM3_QUEUE_SIZE`` slots before its body is read and keeps it until answered; a
  full server answers 429 at once;
- hashing and image decoding run in the thread pool (CPU work, not the GPU thread's business);
  a cache hit on the image's id skips decoding entirely. At most ``SAM3_DECODE_CONCURRENCY``
  decoded images exist at once: a decode slot is held from decoding until the job that encodes
  the image has run;
- encode_image / encode_text / segment run as ONE job on the inference worker (GPU-bound); the
  job keeps each detection's low-resolution mask only;
- mask encoding (RLE/PNG/polygon) runs in the thread pool again, one full-resolution mask at a
  time (engines/masks.py), so the worker is free for the next job while masks are encoded.

Image ids are keyed by the server's secret and the caller's namespace (server/image_ids.py,
server/auth.py), and so is the embedding cache.

Everything the server needs to know about the model it asks the pipeline: the limits and the
checks (``check_prompts``, ``check_options``), the cache keys (``encoder_key``,
``text_encoder_key``), the stage timings (in the embeddings and results it returns), the text
embedding's rows (``TextEmbedding.row``/``stack``).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Sequence

import numpy as np

from engines.factory import embedding_dtype
from engines.options import SegmentOptions
from engines.postprocess import result_document
from engines.types import (
    CheckedPrompts,
    ImageEmbedding,
    ImageSize,
    LoadedImage,
    Prompt,
    Prompts,
    SegmentResult,
    TextEmbedding,
    add_timings,
)
from server.cache import EmbeddingCache, TextCache
from server.errors import ImageNotCached, NotReady, QueueFull
from server.cpu import CpuWork
from server.image_ids import ImageIds
from server.metrics import Metrics
from server.schemas import response_timings
from server.settings import Settings
from server.worker import InferenceWorker

if TYPE_CHECKING:  # the worker thread imports the runtime; the HTTP layer only needs its types
    from engines.pipeline import Sam3Pipeline

ImageKey = tuple[str, str, str]  # (namespace, image_id, the image encoder's weights hash)


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    backend: str
    precision: str


@dataclass(frozen=True)
class Embedded:
    """What POST /embed answers."""

    image_id: str
    image_size: ImageSize
    cached: bool  # it was already in the cache: no encoder run


@dataclass(frozen=True)
class Segmented:
    """What POST /segment answers: the result document plus how it was obtained."""

    image_id: str
    image_size: ImageSize
    cache_hit: bool
    document: dict[str, Any]  # engines.postprocess.result_document (masks encoded)
    timings_ms: dict[str, float]  # RESPONSE_STAGES
    model: ModelIdentity


@dataclass
class _Encoded:
    embedding: ImageEmbedding
    image_hit: bool
    result: SegmentResult | None  # None for /embed
    timings: dict[str, float]
    image_id: str = ""  # the caller's id (keyed by its namespace), set by _encode


class _Evicted(Exception):
    """The embedding was cached when checked but evicted before the job ran: decode and retry."""


class SegmentService:
    """Glue between the HTTP layer, the caches and the single inference worker."""

    def __init__(
        self,
        settings: Settings,
        worker: InferenceWorker[Sam3Pipeline],
        image_cache: EmbeddingCache[ImageEmbedding],
        text_cache: TextCache[TextEmbedding],
        metrics: Metrics,
        ids: ImageIds,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self.image_cache = image_cache
        self.text_cache = text_cache
        self.metrics = metrics
        self.ids = ids
        self.in_flight = 0  # admitted requests (reading, decoding, queued, running, encoding)
        # Decode slots, and the low-priority threads of all CPU work (server/cpu.py).
        self.cpu = CpuWork(threads=settings.decode_concurrency + 2, decode_slots=settings.decode_concurrency)
        self.decoding = 0  # decoded images alive now (<= decode_concurrency)
        self.decoding_peak = 0

    # -- admission ---------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """One of ``queue_size`` slots for the whole request, taken before its body is read
        (server/middleware.py): a full server refuses at once (429) without reading, hashing or
        decoding anything."""
        if self.in_flight >= self.settings.queue_size:
            self.worker.stats.rejected_full += 1
            raise QueueFull(
                f"server is full ({self.settings.queue_size} requests in progress); retry later",
                retry_after_s=self.worker.retry_after_s(),
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    # -- identity ---------------------------------------------------------------------------
    @property
    def pipeline(self) -> Sam3Pipeline | None:
        return self.worker.pipeline

    def ready_pipeline(self) -> Sam3Pipeline:
        """The pipeline, or NotReady: asked once per operation, before any work is done for it."""
        pipeline = self.pipeline
        if pipeline is None or self.worker.state != "ready":
            raise NotReady(f"inference engines are not ready (state: {self.worker.state})")
        return pipeline

    def image_key(self, namespace: str, image_id: str) -> ImageKey:
        return (namespace, image_id, self.ready_pipeline().encoder_key)

    # -- operations --------------------------------------------------------------------------
    async def embed(self, data: bytes, namespace: str = "") -> Embedded:
        """Encode (or find) an image's embedding."""
        pipeline = self.ready_pipeline()
        encoded = await self._encode(pipeline, namespace, data, None, prompts=None, options=None)
        embedding = encoded.embedding
        return Embedded(encoded.image_id, embedding.image_size, cached=encoded.image_hit)

    async def segment(
        self,
        *,
        data: bytes | None,
        image_id: str | None,
        prompts: Sequence[str | Prompt],
        options: SegmentOptions,
        mask_format: str,
        namespace: str = "",
    ) -> Segmented:
        t0 = time.perf_counter()
        # The pipeline's own checks and limits, here in the event loop: a bad request is refused
        # before it costs any work. Box bounds wait for the image; the job's segment checks them.
        pipeline = self.ready_pipeline()
        checked = pipeline.check_prompts(prompts)
        options = pipeline.check_options(options)
        share = self.detection_share(len(checked))
        if options.max_detections is None or options.max_detections > share:
            options = replace(options, max_detections=share)
        encoded = await self._encode(pipeline, namespace, data, image_id, prompts=checked, options=options)
        result = encoded.result
        assert result is not None
        t_post = time.perf_counter()
        document = await self.cpu.run(
            lambda: result_document(result.image_size, result.results, mask_format=mask_format)
        )
        timings = encoded.timings
        timings["postprocess"] += (time.perf_counter() - t_post) * 1e3  # the masks, encoded here
        timings["total"] = (time.perf_counter() - t0) * 1e3
        response = response_timings(timings)
        for stage, ms in response.items():
            self.metrics.observe_stage(stage, ms / 1e3)
        return Segmented(
            image_id=encoded.image_id,
            image_size=encoded.embedding.image_size,
            cache_hit=encoded.image_hit,
            document=document,
            timings_ms=response,
            model=self.model_identity(),
        )

    def detection_share(self, prompt_count: int) -> int:
        """Detections each of ``prompt_count`` prompts may keep in one answer (a request, or one
        frame of a stream): prompts x detections, so the masks held, is bounded by SAM3_MAX_MASKS."""
        return max(1, self.settings.max_masks // prompt_count)

    def admission(self) -> dict[str, int]:
        """Requests and decoded images in progress, against their capacities (/info, /metrics)."""
        return {
            "capacity": self.settings.queue_size, "in_flight": self.in_flight,
            "decode_slots": self.settings.decode_concurrency, "decoding": self.decoding,
            "decoding_peak": self.decoding_peak,
        }  # fmt: skip

    def delete(self, image_id: str, namespace: str = "") -> None:
        if not self.image_cache.delete(self.image_key(namespace, image_id)):
            raise ImageNotCached(f"image {image_id} is not cached")

    def model_identity(self) -> ModelIdentity:
        pipeline = self.pipeline
        if pipeline is None:
            return ModelIdentity("", "", "")
        return ModelIdentity(pipeline.manifest.name, pipeline.backend.kind, pipeline.backend.precision)

    def cache_dtype(self) -> str:
        """The dtype embeddings are stored in (see Settings.cache_dtype)."""
        if self.settings.cache_dtype != "auto":
            return self.settings.cache_dtype
        return embedding_dtype(self.model_identity().precision)

    def _cacheable(self, embedding: ImageEmbedding) -> ImageEmbedding:
        """The embedding as cached. Every request, the first included, decodes from this form,
        so a cold and a warm answer for the same image are identical."""
        dtype = np.dtype(self.cache_dtype())
        if all(t.dtype == dtype for t in embedding.tensors.values()):
            return embedding
        return replace(embedding, tensors={k: v.astype(dtype) for k, v in embedding.tensors.items()})

    # -- internals ---------------------------------------------------------------------------
    async def _encode(
        self,
        pipeline: Sam3Pipeline,
        namespace: str,
        data: bytes | None,
        image_id: str | None,
        *,
        prompts: CheckedPrompts | None,
        options: SegmentOptions | None,
    ) -> _Encoded:
        if data is not None:
            image_id = await self.cpu.run(self.ids.of, namespace, data)
        assert image_id is not None
        key: ImageKey = (namespace, image_id, pipeline.encoder_key)
        if data is not None and key not in self.image_cache:
            encoded = await self._run_decoded(pipeline, key, data, prompts, options)
        else:
            try:
                encoded = await self._run(self._job(key, None, prompts, options, from_bytes=data is not None))
            except _Evicted:  # cached when looked up, gone when the job ran: decode after all
                assert data is not None
                encoded = await self._run_decoded(pipeline, key, data, prompts, options)
        encoded.image_id = image_id
        return encoded

    async def _run_decoded(
        self, pipeline: Sam3Pipeline, key: ImageKey, data: bytes, prompts: CheckedPrompts | None,
        options: SegmentOptions | None,
    ) -> _Encoded:
        """Decode under a decode slot, held until the job that encodes the image has run."""
        async with self.cpu.slots:
            self.decoding += 1
            self.decoding_peak = max(self.decoding_peak, self.decoding)
            try:
                loaded = await self.cpu.run(lambda: pipeline.load_image(data, image_id=key[1]))
                job = self._job(key, loaded, prompts, options, from_bytes=True)
                del loaded  # the job holds the pixels now, and drops them once encoded
                return await self._run(job)
            finally:
                self.decoding -= 1

    async def _run(self, job: Callable[[Sam3Pipeline], _Encoded]) -> _Encoded:
        result = await self.worker.run(job, timeout_s=self.settings.request_timeout_s)
        encoded = result.value
        encoded.timings["queue"] = result.queue_ms
        return encoded

    def _job(
        self,
        key: ImageKey,
        loaded: LoadedImage | None,
        prompts: CheckedPrompts | None,
        options: SegmentOptions | None,
        from_bytes: bool,
    ) -> Callable[[Sam3Pipeline], _Encoded]:
        image_cache, text_cache = self.image_cache, self.text_cache
        pixels = [loaded]  # emptied once encoded: the decoded image is not held any longer

        def job(pipeline: Sam3Pipeline) -> _Encoded:
            image = pixels.pop() if pixels else None
            if image is not None:
                embedding, hit = image_cache.get_or_compute(
                    key, lambda: self._cacheable(pipeline.encode_image(image)))
                del image
            else:
                cached = image_cache.get(key)
                if cached is None:
                    if from_bytes:
                        raise _Evicted()
                    raise ImageNotCached(f"image {key[1]} is not cached; send the image again")
                embedding, hit = cached, True
            image_timings = {} if hit else embedding.timings_ms  # encoded by this request, or not
            if prompts is None or options is None:
                return _Encoded(embedding, hit, None, add_timings(image_timings))
            # Cached per prompt text; a box-only prompt's text is "visual".
            text = _text_embedding(pipeline, text_cache, prompts.texts)
            # Given both embeddings, segment runs only the (geometry encoder and) decoder and
            # postprocessing; the boxes are checked against this image's size there.
            result = pipeline.segment(embedding, prompts, options, text=text)
            return _Encoded(embedding, hit, result, add_timings(image_timings, text.timings_ms, result.timings_ms))

        return job


def _text_embedding(pipeline: Sam3Pipeline, cache: TextCache[TextEmbedding], prompts: Prompts) -> TextEmbedding:
    """Per-prompt cached text embeddings, missing ones encoded in one batched call.

    The result's ``timings_ms`` are those of that one call ({} when every prompt was cached).
    """
    found: dict[str, TextEmbedding] = {}
    missing: list[str] = []
    for prompt in dict.fromkeys(prompts):
        cached = cache.get(prompt)
        if cached is None:
            missing.append(prompt)
        else:
            found[prompt] = cached
    timings: dict[str, float] = {}
    if missing:
        fresh = pipeline.encode_text(Prompts(missing))  # a subset of checked prompts
        timings = fresh.timings_ms
        for i, prompt in enumerate(missing):
            found[prompt] = fresh.row(i)
            cache.put(prompt, found[prompt])
    return TextEmbedding.stack([found[p] for p in prompts], timings)
