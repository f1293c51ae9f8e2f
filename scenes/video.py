"""Seeded moving scenes: shapes that move, turn, cross, cover each other, enter and leave, with
per-frame ground truth that keeps each object's identity.

The tracking benchmark (``python -m benchmarks tracking``) and the stream tests play these as
real video files: :func:`write_video` encodes H.264 MP4 with PyAV, so what is measured goes
through the same decoder a camera stream does. A video is a pure function of its seed and
options; frames are rendered one at a time (memory does not grow with the length).

Ground truth per frame is each object's *visible* part (objects drawn later cover earlier ones),
counted when at least ``min_visible`` of the whole shape is in view: the visibility cut MOT
benchmarks use. A visible sliver below the cut (at the border, or mostly behind another shape)
is marked ``ignore``: finding it is neither required nor a false positive (the benchmark drops
tracks that match it, as TrackEval does with MOT17's ignore regions).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from engines.bundle import write_atomic
from scenes.generator import (
    BASE_SHAPES,
    COLOUR_JITTER,
    COLOURS,
    ShapePose,
    background,
    draw_shape,
    mask_box,
    sample_pose,
    visible_parts,
)


@dataclass(frozen=True)
class VideoOptions:
    frames: int = 40
    fps: int = 10
    size: tuple[int, int] = (320, 240)  # (width, height); even, as H.264 in yuv420p needs
    objects: tuple[int, int] = (2, 5)
    speed: tuple[float, float] = (2.0, 6.0)  # pixels per frame
    max_spin: float = 0.08  # radians per frame
    entering: float = 0.3  # share of objects that enter after the first frame, from an edge
    shapes: tuple[str, ...] = BASE_SHAPES
    min_visible: float = 0.25
    crf: int = 23  # H.264 quality (lower is better)


@dataclass(frozen=True)
class Track:
    """One object's path: the pose at ``first`` frame, then constant velocity and spin."""

    track_id: int  # 1-based, as MOT ground truth numbers them
    colour: str
    shape: str
    fill: tuple[float, float, float] = field(repr=False)
    start: ShapePose
    velocity: tuple[float, float]
    spin: float
    first: int  # the frame it appears (it leaves when its path leaves the image)

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    def pose(self, index: int) -> ShapePose | None:
        if index < self.first:
            return None
        t = index - self.first
        s = self.start
        return ShapePose(s.cx + self.velocity[0] * t, s.cy + self.velocity[1] * t, s.radius,
                         s.angle + self.spin * t, s.inner)


@dataclass(frozen=True)
class TruthObject:
    track_id: int
    colour: str
    shape: str
    box: tuple[float, float, float, float]  # pixel xyxy of the visible part
    mask: np.ndarray = field(repr=False)
    ignore: bool = False  # visible, but less than ``min_visible`` of it

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class MovingScene:
    seed: int
    options: VideoOptions
    tracks: tuple[Track, ...]
    backdrop: np.ndarray = field(repr=False)  # float32 [H, W, 3]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.backdrop.shape[0], self.backdrop.shape[1]

    def kinds(self) -> list[str]:
        """The categories in the video, in track order without repeats."""
        return list(dict.fromkeys(t.category for t in self.tracks))

    def render(self, index: int) -> tuple[np.ndarray, list[TruthObject]]:
        """Frame ``index`` as uint8 RGB, and its visible objects (``ignore`` below the cut)."""
        height, width = self.size
        canvas = self.backdrop.copy()
        drawn: list[tuple[Track, np.ndarray, int]] = []  # track, full mask, area wholly in view
        for track in self.tracks:
            pose = track.pose(index)
            if pose is None:
                continue
            full = draw_shape(track.shape, pose, height, width)
            whole = _whole_area(track.shape, pose)
            canvas[full] = track.fill
            drawn.append((track, full, whole))
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=0.6)
        rgb = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        truth = []
        for (track, _, whole), visible in zip(drawn, visible_parts([m for _, m, _ in drawn])):
            if visible.any():
                ignore = bool(visible.sum() < self.options.min_visible * whole)
                truth.append(TruthObject(track.track_id, track.colour, track.shape, mask_box(visible), visible, ignore))
        return rgb, truth

    def frames(self) -> Iterator[tuple[np.ndarray, list[TruthObject]]]:
        for index in range(self.options.frames):
            yield self.render(index)


def _whole_area(shape: str, pose: ShapePose) -> int:
    """The shape's area were it wholly in view (its own canvas, big enough to hold it)."""
    side = int(math.ceil(pose.radius * 2.4)) + 4
    centred = ShapePose(side / 2, side / 2, pose.radius, pose.angle, pose.inner)
    return int(draw_shape(shape, centred, side, side).sum())


def generate_video(seed: int, options: VideoOptions = VideoOptions()) -> MovingScene:
    rng = np.random.default_rng([seed, 0x51DE0])
    width, height = options.size
    if width % 2 or height % 2:
        raise ValueError(f"video size must be even, got {width}x{height}")
    backdrop = background(rng, height, width)
    count = int(rng.integers(options.objects[0], options.objects[1] + 1))
    tracks = []
    for track_id in range(1, count + 1):
        shape = str(rng.choice(options.shapes))
        colour = str(rng.choice(list(COLOURS)))
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = tuple(float(v) for v in np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255))
        pose = sample_pose(rng, shape, height, width)
        speed = float(rng.uniform(*options.speed))
        heading = float(rng.uniform(0, 2 * math.pi))
        first = 0
        if track_id > 1 and rng.random() < options.entering:
            # Enter from an edge, heading inwards, some time in the first half.
            first = int(rng.integers(1, max(2, options.frames // 2)))
            edge = int(rng.integers(4))
            r = pose.radius
            cx, cy = [(-r, pose.cy), (width + r, pose.cy), (pose.cx, -r), (pose.cx, height + r)][edge]
            pose = ShapePose(cx, cy, pose.radius, pose.angle, pose.inner)
            heading = [0.0, math.pi, math.pi / 2, -math.pi / 2][edge] + float(rng.uniform(-0.6, 0.6))
        velocity = (speed * math.cos(heading), speed * math.sin(heading))
        spin = float(rng.uniform(-options.max_spin, options.max_spin))
        tracks.append(Track(track_id, colour, shape, fill, pose, velocity, spin, first))  # type: ignore[arg-type]
    return MovingScene(seed, options, tuple(tracks), backdrop)


def write_video(scene: MovingScene, path: Path) -> list[list[TruthObject]]:
    """Encode ``scene`` as H.264 at ``path`` (atomically): MP4, or MPEG-TS for a ``.ts`` name
    (streamable: readable from any point, as a broadcast is). Returns its ground truth."""
    import av  # only here: the scene renderer itself is numpy + OpenCV

    height, width = scene.size
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    truth: list[list[TruthObject]] = []
    try:
        with av.open(str(partial), "w", format="mpegts" if path.suffix == ".ts" else "mp4") as container:
            stream = container.add_stream("libx264", rate=scene.options.fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            # One thread, no B-frame lookahead: the same bytes on every machine, frames out in order.
            stream.options = {"crf": str(scene.options.crf), "threads": "1", "bf": "0"}
            for rgb, objects in scene.frames():
                truth.append(objects)
                for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return truth


def truth_document(scene: MovingScene, truth: list[list[TruthObject]]) -> dict[str, object]:
    """The ground truth as JSON: tracks (id, category) and, per frame, the visible boxes."""
    return {
        "seed": scene.seed,
        "options": asdict(scene.options),
        "size": {"height": scene.size[0], "width": scene.size[1]},
        "tracks": [{"track_id": t.track_id, "category": t.category, "first": t.first} for t in scene.tracks],
        "frames": [[{"track_id": o.track_id, "box": [round(v, 2) for v in o.box], "ignore": o.ignore}
                    for o in objects] for objects in truth],
    }


def write_video_set(directory: Path, count: int, seed: int, options: VideoOptions = VideoOptions()) -> list[Path]:
    """``count`` videos (seeds ``seed``, ``seed + 1``, ...) as ``NNN.mp4`` + ``NNN.json`` truth."""
    paths = []
    for k in range(count):
        scene = generate_video(seed + k, options)
        video = directory / f"{k:03d}.mp4"
        truth = write_video(scene, video)
        write_atomic(directory / f"{k:03d}.json", (json.dumps(truth_document(scene, truth), indent=1) + "\n").encode())
        paths.append(video)
    return paths
