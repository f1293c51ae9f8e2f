"""Live streams: a video source decoded on its own thread, each frame segmented and tracked on the
server's one inference worker, the results fanned out to feeds.

One stream is an asyncio task. It takes the newest decoded frame (older ones are dropped by the
source and counted), at most ``max_fps`` a second; runs :meth:`engines.stream.StreamSession.step`
on the inference worker, in turn with the requests; encodes the event (and, while someone
watches the overlay, a JPEG) on the CPU pool; and hands them to its subscribers. A subscriber's
queue is short and keeps the newest items, so a slow client misses frames instead of growing
the server's memory. A running stream holds one admission slot (``SAM3_QUEUE_SIZE``) for its
life, and ``SAM3_MAX_STREAMS`` bound how many run.

A stream ends in a state with a reason, never an exception: ``ended`` (the source ended),
``failed`` (it could not be opened, stalled, changed beyond the limits, or a frame could not be
segmented), ``stopped`` (DELETE or shutdown). Finished streams stay listed (the newest
``KEEP_FINISHED``) so their reason can be read.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Sequence

import cv2
import numpy as np

from engines.errors import Sam3Error
from engines.stream import FrameEvent, StreamSession, draw_overlay
from engines.tracking import TrackerOptions
from engines.types import Prompt
from engines.video import Frame, VideoSource
from server.errors import DeadlineExceeded, StreamNotFound, TooManyStreams
from server.stream_sources import OpenSpec, resolve_source

if TYPE_CHECKING:
    from server.service import SegmentService
    from server.settings import Settings

log = logging.getLogger("server.streams")

KEEP_FINISHED = 16
FEED_QUEUE = 4  # items a subscriber may lag behind before the oldest is dropped
JPEG_QUALITY = 80
LIVE_STATES = ("starting", "running")


@dataclass(frozen=True)
class StreamRequest:
    """POST /streams, as the route parsed it."""

    source_kind: str  # file | url | device
    source: str
    prompts: Sequence[str | Prompt]
    max_fps: float | None = None
    score_threshold: float = 0.5
    mask_format: str = "none"


class _Feed:
    """One subscriber's queue: bounded, newest kept. ``None`` marks the end of the stream."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=FEED_QUEUE)
        self.missed = 0

    def put(self, item: Any) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.missed += 1
        self.queue.put_nowait(item)


@dataclass
class StreamStats:
    processed: int = 0
    skipped: int = 0  # frames whose job missed the deadline
    tracks_alive: int = 0
    last_frame: int = -1
    latency_ms: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=100))
    done_at: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=50))

    def processed_fps(self, now: float) -> float:
        recent = [t for t in self.done_at if now - t <= 5.0]
        if len(recent) < 2:
            return 0.0
        return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-6)


class LiveStream:
    def __init__(self, stream_id: str, namespace: str, spec: OpenSpec, request: StreamRequest, max_fps: float,
                 session: StreamSession, source: VideoSource) -> None:
        self.id = stream_id
        self.namespace = namespace
        self.spec = spec
        self.request = request
        self.max_fps = max_fps
        self.session = session
        self.source = source
        self.prompts = [p if isinstance(p, str) else p.name for p in request.prompts]
        self.state = "starting"
        self.reason: str | None = None
        self.created = time.time()
        self.finished_at: float | None = None
        self.stats = StreamStats()
        self.events: set[_Feed] = set()
        self.overlays: set[_Feed] = set()
        self.task: asyncio.Task[None] | None = None

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        latency = sorted(self.stats.latency_ms)
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "source": {"kind": self.request.source_kind, "value": self.spec.shown},
            "prompts": self.prompts,
            "max_fps": self.max_fps,
            "mask_format": self.request.mask_format,
            "created_at": self.created,
            "stats": {
                "frames_decoded": self.source.stats.decoded,
                "frames_processed": self.stats.processed,
                "frames_dropped": self.source.stats.dropped,
                "frames_skipped": self.stats.skipped,
                "processed_fps": round(self.stats.processed_fps(now), 2),
                "latency_ms_p50": round(latency[len(latency) // 2], 1) if latency else None,
                "tracks_alive": self.stats.tracks_alive,
                "last_frame": self.stats.last_frame,
                "source_fps": self.source.fps,
                "subscribers": len(self.events) + len(self.overlays),
            },
        }

    def subscribe(self, overlay: bool = False) -> _Feed:
        feed = _Feed()
        if not self.live:
            feed.put(None)
        else:
            (self.overlays if overlay else self.events).add(feed)
        return feed

    def unsubscribe(self, feed: _Feed) -> None:
        self.events.discard(feed)
        self.overlays.discard(feed)

    def _publish(self, feeds: set[_Feed], item: Any) -> None:
        for feed in list(feeds):
            feed.put(item)

    def _finish(self, state: str, reason: str | None) -> None:
        if self.live:
            self.state, self.reason = state, reason
            self.finished_at = time.time()
        for feed in list(self.events | self.overlays):
            feed.put(None)
        self.events.clear()
        self.overlays.clear()


def _jpeg(rgb: np.ndarray, event: FrameEvent) -> bytes:
    overlay = draw_overlay(rgb, event)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:  # pragma: no cover - OpenCV encodes any uint8 image
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


class StreamManager:
    """Every stream of this server: start, list, stop; their tasks and admission slots."""

    def __init__(self, settings: Settings, service: SegmentService) -> None:
        self.settings = settings
        self.service = service
        self.streams: dict[str, LiveStream] = {}

    @property
    def live(self) -> list[LiveStream]:
        return [s for s in self.streams.values() if s.live]

    def get(self, stream_id: str, namespace: str) -> LiveStream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.namespace != namespace:  # another key's stream does not exist
            raise StreamNotFound(f"no stream {stream_id!r}")
        return stream

    def list(self, namespace: str) -> list[LiveStream]:
        return [s for s in self.streams.values() if s.namespace == namespace]

    def _check_room(self) -> None:
        settings = self.settings
        if settings.max_streams == 0:
            raise TooManyStreams("streams are off on this server (SAM3_MAX_STREAMS=0)")
        if len(self.live) >= settings.max_streams:
            raise TooManyStreams(f"{settings.max_streams} streams are running (SAM3_MAX_STREAMS); stop one first")

    async def start(self, request: StreamRequest, namespace: str) -> LiveStream:
        settings = self.settings
        self._check_room()
        pipeline = self.service.ready_pipeline()
        checked = pipeline.check_prompts(list(request.prompts))  # box bounds: on the first frame
        max_fps = min(request.max_fps or settings.stream_max_fps, settings.stream_max_fps)
        # A URL's host is resolved to check it: DNS may take seconds, so not on the event loop.
        spec = await asyncio.get_running_loop().run_in_executor(
            None, resolve_source, request.source_kind, request.source, settings)
        self._check_room()  # again: another start may have taken the room meanwhile
        session = StreamSession(list(checked.items), frame_rate=max_fps,
                                tracker=TrackerOptions.starting_at(request.score_threshold),
                                max_detections=min(settings.max_detections,
                                                   self.service.detection_share(len(checked.items))),
                                with_masks=True)  # the overlay tints masks even when events carry none
        slot = self.service.admit()  # one admission slot for the stream's life (429 when full)
        await slot.__aenter__()
        try:
            source = VideoSource(spec.target, realtime=spec.live, open_timeout_s=settings.stream_timeout_s,
                                 read_timeout_s=settings.stream_timeout_s,
                                 max_pixels=int(settings.max_megapixels * 1e6), input_format=spec.input_format,
                                 options=spec.options)
        except BaseException:
            await slot.__aexit__(None, None, None)
            raise
        stream_id = secrets.token_hex(8)
        stream = LiveStream(stream_id, namespace, spec, request, max_fps, session, source)
        self.streams[stream_id] = stream
        self._forget_old()
        stream.task = asyncio.create_task(self._run(stream, slot), name=f"stream {stream_id}")
        return stream

    async def stop(self, stream_id: str, namespace: str) -> LiveStream:
        stream = self.get(stream_id, namespace)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
            await asyncio.gather(stream.task, return_exceptions=True)
        self.streams.pop(stream_id, None)
        return stream

    async def close(self) -> None:
        """Stop every stream (server shutdown)."""
        tasks = [s.task for s in self.streams.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _forget_old(self) -> None:
        finished = sorted((s for s in self.streams.values() if not s.live), key=lambda s: s.finished_at or 0)
        for stream in finished[:-KEEP_FINISHED] if len(finished) > KEEP_FINISHED else []:
            self.streams.pop(stream.id, None)

    async def _run(self, stream: LiveStream, slot: Any) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / stream.max_fps
        next_start = loop.time()
        state, reason = "stopped", "stopped by request"
        try:
            while True:
                wait = next_start - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                frame = await loop.run_in_executor(None, stream.source.next_frame, 0.5)
                if frame is None:
                    if stream.source.finished:
                        state = "ended" if stream.source.state == "ended" else "failed"
                        reason = stream.source.reason or stream.source.state
                        return
                    continue
                if stream.state == "starting":
                    stream.state = "running"
                next_start = loop.time() + interval
                await self._process(stream, frame)
        except asyncio.CancelledError:
            raise
        except Sam3Error as exc:  # a frame the pipeline refused (a box outside a smaller frame, ...)
            state, reason = "failed", f"{exc.code}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a stream ends with a reason; the server goes on
            log.exception("stream %s failed", stream.id)
            state, reason = "failed", f"internal error: {type(exc).__name__}"
        finally:
            stream._finish(state, reason)
            await loop.run_in_executor(None, stream.source.close)
            await slot.__aexit__(None, None, None)
            self._forget_old()

    async def _process(self, stream: LiveStream, frame: Frame) -> None:
        ready = time.monotonic()
        try:
            result = await self.service.worker.run(lambda pipeline: stream.session.step(pipeline, frame),
                                                   timeout_s=self.settings.request_timeout_s)
        except DeadlineExceeded:
            stream.stats.skipped += 1
            return
        event: FrameEvent = result.value
        cpu = self.service.cpu
        document = await cpu.run(event.to_json, stream.request.mask_format)
        document["stream_id"] = stream.id
        now = time.monotonic()
        stats = stream.stats
        stats.processed += 1
        stats.last_frame = frame.index
        stats.tracks_alive = len(event.tracks)
        stats.latency_ms.append((now - ready) * 1e3)
        stats.done_at.append(now)
        document["latency_ms"] = round((now - ready) * 1e3, 1)
        document["dropped"] = stream.source.stats.dropped
        stream._publish(stream.events, document)
        if stream.overlays:
            stream._publish(stream.overlays, await cpu.run(_jpeg, frame.rgb, event))


async def feed_items(stream: LiveStream, feed: _Feed, heartbeat_s: float = 15.0) -> AsyncIterator[Any]:
    """The items of one subscription until the stream ends; ``b""`` as a heartbeat when quiet
    (a write to a gone client is how the server learns it left)."""
    try:
        while True:
            try:
                item = await asyncio.wait_for(feed.queue.get(), timeout=heartbeat_s)
            except asyncio.TimeoutError:
                yield b""
                continue
            if item is None:
                return
            yield item
    finally:
        stream.unsubscribe(feed)
