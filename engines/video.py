"""Video sources: frames decoded by PyAV (FFmpeg) on their own thread, newest first.

A camera does not wait for a slow consumer, so neither does a :class:`VideoSource` by default:
the reader thread keeps only the newest decoded frame, and a frame replaced before anyone took
it counts as dropped (latest-frame policy: a late answer about an old frame is worth less than a
current one). ``every_frame=True`` makes the reader wait instead; benchmarks use it to score
every frame of a file. Files play at their own frame rate when ``realtime`` (as a camera would
deliver them), or as fast as they decode.

The source never raises into its consumer: it ends in a state (``ended``, ``failed``) with a
reason, and :meth:`VideoSource.next_frame` returns None from then on. Memory is bounded: one
frame in the slot, one being decoded.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("engines.video")

SOURCE_STATES = ("opening", "running", "ended", "failed", "closed")


@dataclass(frozen=True)
class Frame:
    index: int  # decoded frames since the source opened, 0-based (dropped ones count too)
    timestamp_s: float  # presentation time in the source (seconds from its start)
    rgb: np.ndarray = field(repr=False)  # uint8 [H, W, 3]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


@dataclass
class SourceStats:
    decoded: int = 0
    dropped: int = 0  # replaced in the slot before the consumer took them


class VideoSource:
    """One open source (file path, rtsp/http(s) URL or capture device) read on its own thread.

    ``open_timeout_s`` bounds connecting; ``read_timeout_s`` bounds a stall (no packet for that
    long ends the source as ``failed``). ``max_pixels`` refuses frames larger than the consumer
    can afford (the source fails with the reason rather than allocating them downstream).
    """

    def __init__(
        self,
        url: str,
        *,
        realtime: bool = True,
        every_frame: bool = False,
        open_timeout_s: float = 10.0,
        read_timeout_s: float = 10.0,
        max_pixels: int | None = None,
        input_format: str | None = None,
        options: dict[str, str] | None = None,
    ) -> None:
        self.url = url
        self.realtime = realtime
        self.every_frame = every_frame
        self.open_timeout_s = open_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_pixels = max_pixels
        self.input_format = input_format
        self.options = dict(options or {})
        self.stats = SourceStats()
        self.state = "opening"
        self.reason: str | None = None
        self.fps: float | None = None  # the source's declared frame rate, once open
        self._slot: Frame | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"video:{url[:40]}", daemon=True)
        self._thread.start()

    # -- consumer side ------------------------------------------------------------------------
    def next_frame(self, timeout_s: float) -> Frame | None:
        """The newest frame not yet taken, waiting up to ``timeout_s``; None on timeout or once
        the source has ended, failed or closed (see ``state`` and ``reason``)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._slot is None:
                if self.state not in ("opening", "running"):
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            frame, self._slot = self._slot, None
            self._cond.notify_all()  # an every_frame reader waits for the slot to empty
            return frame

    @property
    def finished(self) -> bool:
        """No frame will come any more (ended, failed or closed, and the slot is empty)."""
        with self._cond:
            return self._slot is None and self.state not in ("opening", "running")

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop reading and free the decoder; safe to call twice."""
        self._stop.set()
        with self._cond:
            if self.state in ("opening", "running"):
                self.state = "closed"
            self._slot = None
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- reader thread ------------------------------------------------------------------------
    def _finish(self, state: str, reason: str | None) -> None:
        with self._cond:
            if self.state in ("opening", "running"):
                self.state, self.reason = state, reason
            self._cond.notify_all()

    def _put(self, frame: Frame) -> bool:
        with self._cond:
            if self.every_frame:
                while self._slot is not None and not self._stop.is_set():
                    self._cond.wait(0.1)
            elif self._slot is not None:
                self.stats.dropped += 1
            if self._stop.is_set():
                return False
            self._slot = frame
            self.stats.decoded += 1
            self._cond.notify_all()
            return True

    def _run(self) -> None:
        try:
            import av  # lazily: only a process that reads video needs FFmpeg
        except ImportError:  # pragma: no cover - PyAV is in requirements/runtime.txt
            self._finish("failed", "PyAV (the av package) is not installed")
            return
        try:
            container = av.open(self.url, format=self.input_format, options=self.options,
                                timeout=(self.open_timeout_s, self.read_timeout_s))
        except av.error.ExitError:  # the open timeout interrupted FFmpeg
            self._finish("failed", f"cannot open the source: no answer within {self.open_timeout_s:g} s")
            return
        except Exception as exc:  # noqa: BLE001 - every FFmpeg failure is a reason, not a crash
            self._finish("failed", f"cannot open the source: {_reason(exc)}")
            return
        try:
            self._decode(container)
        except Exception as exc:  # noqa: BLE001
            if not self._stop.is_set():
                log.info("video source %s failed: %s", self.url, _reason(exc))
                if isinstance(exc, av.error.ExitError):  # PyAV's read timeout interrupted FFmpeg
                    self._finish("failed", f"stalled: no data for {self.read_timeout_s:g} s")
                else:
                    self._finish("failed", f"decoding failed: {_reason(exc)}")
        finally:
            container.close()

    def _decode(self, container: Any) -> None:
        if not container.streams.video:
            self._finish("failed", "the source has no video stream")
            return
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        self.fps = float(rate) if rate else None
        with self._cond:
            if self.state == "opening":
                self.state = "running"
        started = time.monotonic()
        first_pts: float | None = None
        index = 0
        for decoded in container.decode(stream):
            if self._stop.is_set():
                return
            pixels = int(decoded.width) * int(decoded.height)
            if self.max_pixels is not None and pixels > self.max_pixels:
                self._finish("failed", f"frames of {decoded.width}x{decoded.height} exceed the limit of "
                                       f"{self.max_pixels / 1e6:g} megapixels")
                return
            seconds = float(decoded.time) if decoded.time is not None else index / (self.fps or 30.0)
            if first_pts is None:
                first_pts = seconds
            timestamp = seconds - first_pts
            if self.realtime:  # play a file as a camera would deliver it
                wait = started + timestamp - time.monotonic()
                if wait > 0 and self._stop.wait(wait):
                    return
            if not self._put(Frame(index, timestamp, decoded.to_ndarray(format="rgb24"))):
                return
            index += 1
        self._finish("ended", "the source ended")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
