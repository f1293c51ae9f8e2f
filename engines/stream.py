"""One video stream through the pipeline: frames in, tracked detections with stable ids out.

:class:`StreamSession.step` is the whole per-frame job (segment the frame with the stream's
prompts, then track), so the server runs it on its inference worker exactly as the CLI and the
benchmarks run it directly; :func:`run_stream` is their loop over a :class:`VideoSource` with a
frame-rate cap. Each frame is decoded in full once: the image encoder sees every processed frame
(there is no embedding to reuse between frames of a moving scene); the prompts' words are
encoded once per stream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import cv2
import numpy as np

from engines.options import SegmentOptions
from engines.postprocess import encode_mask
from engines.tracking import StreamTracker, TrackedDetection, TrackerOptions
from engines.types import Prompt, TextEmbedding, add_timings
from engines.video import Frame, VideoSource

if TYPE_CHECKING:
    from engines.pipeline import Sam3Pipeline


@dataclass(frozen=True)
class FrameEvent:
    """What a stream reports for one processed frame."""

    index: int  # the source's frame index (skipped numbers are dropped frames)
    timestamp_s: float  # presentation time in the source
    size: tuple[int, int]  # (height, width)
    tracks: tuple[TrackedDetection, ...]
    timings_ms: dict[str, float] = field(default_factory=dict)  # pipeline stages + "track"
    reset: bool = False  # the frame size changed: ids restart from here

    def to_json(self, mask_format: str = "none") -> dict[str, Any]:
        """``{"frame", "timestamp_s", "size", "reset", "tracks": [{"track_id", "prompt",
        "score", "box", "mask"}]}``; masks encoded as /segment encodes them ("none": null)."""
        return {
            "frame": self.index,
            "timestamp_s": round(self.timestamp_s, 4),
            "size": {"height": self.size[0], "width": self.size[1]},
            "reset": self.reset,
            "tracks": [
                {
                    "track_id": t.track_id,
                    "prompt": t.prompt,
                    "score": round(float(t.score), 4),
                    "box": [round(float(v), 2) for v in t.box],
                    "mask": None if mask_format == "none" or t.detection.mask_source is None
                    else encode_mask(t.detection.mask_source, mask_format),
                }
                for t in self.tracks
            ],
        }


class StreamSession:
    """The prompts, tracker and options of one stream; not thread-safe (one frame at a time)."""

    def __init__(
        self,
        prompts: Sequence[str | Prompt],
        *,
        frame_rate: float,
        tracker: TrackerOptions = TrackerOptions(),
        mask_threshold: float = 0.5,
        max_detections: int | None = None,
        with_masks: bool = True,
    ) -> None:
        if not prompts:
            raise ValueError("a stream needs at least one prompt")
        self.tracker = StreamTracker(prompts, frame_rate, tracker)
        # Ask for detections down to the tracker's low threshold: ByteTrack's second stage.
        self.options = SegmentOptions(score_threshold=tracker.low_threshold, mask_threshold=mask_threshold,
                                      max_detections=max_detections, with_masks=with_masks)
        self._size: tuple[int, int] | None = None
        self._text: TextEmbedding | None = None

    def step(self, pipeline: Sam3Pipeline, frame: Frame) -> FrameEvent:
        reset = self._size is not None and frame.size != self._size
        if reset:
            self.tracker.reset()
        self._size = frame.size
        prompts = self.tracker.prompts_for_next_frame()
        encoded: dict[str, float] = {}
        if self._text is None:  # a stream's words never change (its boxes move): encode them once
            self._text = pipeline.encode_text(pipeline.check_prompts(prompts).texts)
            encoded = self._text.timings_ms
        result = pipeline.segment(frame.rgb, prompts, self.options, text=self._text)
        started = time.perf_counter()
        tracks = self.tracker.update(result.results, frame.size)
        timings = add_timings(result.timings_ms, encoded)
        timings["track"] = (time.perf_counter() - started) * 1e3
        return FrameEvent(frame.index, frame.timestamp_s, frame.size, tuple(tracks), timings, reset)


def run_stream(
    pipeline: Sam3Pipeline,
    source: VideoSource,
    session: StreamSession,
    *,
    max_fps: float | None = None,
    max_frames: int | None = None,
    idle_timeout_s: float = 30.0,
) -> Iterator[FrameEvent]:
    """Process ``source`` until it ends (or ``max_frames``), at most ``max_fps`` frames a second;
    frames that arrive meanwhile are dropped by the source (newest first)."""
    interval = 1.0 / max_fps if max_fps else 0.0
    processed = 0
    next_start = time.monotonic()
    while max_frames is None or processed < max_frames:
        wait = next_start - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        frame = source.next_frame(idle_timeout_s)
        if frame is None:
            return
        next_start = time.monotonic() + interval
        yield session.step(pipeline, frame)
        processed += 1


def draw_overlay(rgb: np.ndarray, event: FrameEvent) -> np.ndarray:
    """The frame with each track's mask tinted, its box and "#id prompt score" drawn (RGB)."""
    out = rgb.copy()
    for track in event.tracks:
        colour = _track_colour(track.track_id)
        mask = track.detection.mask
        if mask is not None and mask.shape == out.shape[:2]:
            out[mask] = (0.55 * out[mask] + 0.45 * np.asarray(colour)).astype(np.uint8)
        x0, y0, x1, y1 = (int(round(v)) for v in track.box)
        cv2.rectangle(out, (x0, y0), (x1, y1), colour, 2)
        label = f"#{track.track_id} {track.prompt} {track.score:.2f}"
        cv2.putText(out, label, (x0 + 2, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1, cv2.LINE_AA)
    return np.asarray(out)


def _track_colour(track_id: int) -> tuple[int, int, int]:
    """A bright colour per id (hues spread by a step coprime with OpenCV's 180)."""
    hsv = np.asarray([[[(track_id * 47) % 180, 220, 255]]], dtype=np.uint8)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(rgb[0]), int(rgb[1]), int(rgb[2])
