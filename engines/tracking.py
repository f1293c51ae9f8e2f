"""Identities across frames: ByteTrack (Roboflow's ``trackers``) per prompt over SAM3's detections.

SAM3 finds every instance a prompt names in each frame; a tracker gives the same object the same
id from frame to frame. One ByteTrack runs per prompt (a "red circle" track never jumps to a
blue one), on the detections' boxes and scores; each track keeps its detection's mask.

ByteTrack's point is its second, low-score association: detections between ``low_threshold``
and the user's threshold may continue a track but never start one. So a stream asks the pipeline
for detections down to ``low_threshold`` and reports only tracked ones.

Box prompts drawn on the first frame follow their object: each positive box is re-anchored on
every frame at the box of the track it started on (an exemplar box must cover the object in the
frame being decoded, and the object moves).

SAM3's own video tracker (a memory bank of past masks, propagated per object) is the upgrade
path: docs/streams.md says what exporting it would take.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from engines.types import Detection, ExemplarBox, Prompt, PromptResult


@dataclass(frozen=True)
class TrackerOptions:
    score_threshold: float = 0.5  # starts a track (ByteTrack's high-confidence stage)
    # May continue one (its second stage); the pipeline's threshold. 0.1 was chosen on validation
    # videos (seed 100): MOTA 0.604 against 0.586 at 0.2.
    low_threshold: float = 0.1
    lost_track_s: float = 1.0  # how long a lost track may come back with its id
    confirm_frames: int = 2  # consecutive frames before a new track gets an id
    min_iou: float = 0.1  # box overlap with a track's prediction that can match it

    @classmethod
    def starting_at(cls, score_threshold: float) -> "TrackerOptions":
        """Tracks start at ``score_threshold``; the second stage reaches down to the default low
        threshold, never above the start."""
        return cls(score_threshold=score_threshold, low_threshold=min(cls.low_threshold, score_threshold))


@dataclass(frozen=True)
class TrackedDetection:
    track_id: int  # unique within a stream, across prompts
    prompt_index: int
    prompt: str
    detection: Detection = field(repr=False)

    @property
    def score(self) -> float:
        return self.detection.score

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.detection.box


def _box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class StreamTracker:
    """ByteTrack per prompt for one stream; :meth:`prompts_for_next_frame` moves box prompts."""

    def __init__(self, prompts: Sequence[str | Prompt], frame_rate: float, options: TrackerOptions = TrackerOptions()) -> None:
        if not 0 < options.low_threshold <= options.score_threshold <= 1:
            raise ValueError("TrackerOptions needs 0 < low_threshold <= score_threshold <= 1")
        self.options = options
        self.frame_rate = max(1.0, float(frame_rate))
        self._initial = [p if isinstance(p, Prompt) else Prompt(text=p) for p in prompts]
        self._current = list(self._initial)
        # Per box prompt, per box: the stream track id it follows and that track's box size when
        # bound (None: not bound yet).
        self._anchors: list[list[tuple[int, tuple[float, float]] | None]] = [
            [None] * len(p.boxes) for p in self._initial]
        self._ids: dict[tuple[int, int], int] = {}
        self._next_id = 1
        self._trackers = [self._new_tracker() for _ in self._initial]

    def _new_tracker(self) -> Any:
        from trackers import ByteTrackTracker  # lazily: only streams need it

        o = self.options
        return ByteTrackTracker(
            lost_track_buffer=max(1, round(o.lost_track_s * self.frame_rate)),
            frame_rate=self.frame_rate,
            track_activation_threshold=o.score_threshold,
            minimum_consecutive_frames=o.confirm_frames,
            minimum_iou_threshold=o.min_iou,
            high_conf_det_threshold=o.score_threshold,
        )

    def reset(self) -> None:
        """Forget every track (the frame size changed: old boxes mean nothing in the new one).
        Box prompts go back to where they were drawn."""
        self._trackers = [self._new_tracker() for _ in self._initial]
        self._current = list(self._initial)
        self._anchors = [[None] * len(p.boxes) for p in self._initial]

    def prompts_for_next_frame(self) -> list[Prompt]:
        return list(self._current)

    def update(self, results: Sequence[PromptResult], size: tuple[int, int]) -> list[TrackedDetection]:
        """The detections of one frame of ``size`` (height, width), one result per prompt in
        prompt order -> the tracked ones."""
        import supervision as sv  # the trackers' detection type

        if len(results) != len(self._trackers):
            raise ValueError(f"{len(results)} results for {len(self._trackers)} prompts")
        out: list[TrackedDetection] = []
        for index, (result, tracker) in enumerate(zip(results, self._trackers)):
            dets = [d for d in result.detections if d.score >= self.options.low_threshold]
            boxes = np.asarray([d.box for d in dets], dtype=np.float32).reshape(-1, 4)
            found = sv.Detections(xyxy=boxes, confidence=np.asarray([d.score for d in dets], dtype=np.float32),
                                  data={"index": np.arange(len(dets))})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tracked = tracker.update(found)
            for local_id, det_index in zip(tracked.tracker_id, tracked.data.get("index", ())):
                if local_id < 0:
                    continue
                key = (index, int(local_id))
                if key not in self._ids:
                    self._ids[key] = self._next_id
                    self._next_id += 1
                out.append(TrackedDetection(self._ids[key], index, result.prompt, dets[int(det_index)]))
        self._follow(out, size)
        return sorted(out, key=lambda t: (t.prompt_index, t.track_id))

    def _follow(self, tracked: list[TrackedDetection], size: tuple[int, int]) -> None:
        """Re-anchor each positive exemplar box on the track it follows: centred on the track's
        box, with the drawn box's size scaled as the track's box has grown or shrunk since it was
        bound. (Taking the detection's box itself compounds the model's habit of boxing a
        box-prompted object a little small: on validation videos the box shrank frame after
        frame, MOTA 0.09 against 0.25.) Kept inside the frame."""
        height, width = size
        for index, prompt in enumerate(self._current):
            if not prompt.boxes:
                continue
            mine = [t for t in tracked if t.prompt_index == index]
            anchors = self._anchors[index]
            drawn = self._initial[index].boxes
            boxes = list(prompt.boxes)
            for k, exemplar in enumerate(boxes):
                if not exemplar.positive:
                    continue
                if anchors[k] is None and mine:  # bind to the track that best covers the drawn box
                    best = max(mine, key=lambda t: _box_iou(t.box, exemplar.box))
                    if _box_iou(best.box, exemplar.box) > 0:
                        anchors[k] = (best.track_id, _extent(best.box))
                bound = anchors[k]
                match = None if bound is None else next((t for t in mine if t.track_id == bound[0]), None)
                if match is None or bound is None:
                    continue
                (bw, bh), (mw, mh) = bound[1], _extent(match.box)
                dw, dh = _extent(drawn[k].box)
                w, h = dw * mw / max(bw, 1e-6), dh * mh / max(bh, 1e-6)
                cx, cy = (match.box[0] + match.box[2]) / 2, (match.box[1] + match.box[3]) / 2
                x0, x1 = max(0.0, cx - w / 2), min(float(width), cx + w / 2)
                y0, y1 = max(0.0, cy - h / 2), min(float(height), cy + h / 2)
                if x1 - x0 >= 1 and y1 - y0 >= 1:
                    boxes[k] = ExemplarBox((x0, y0, x1, y1), True)
            self._current[index] = replace(prompt, boxes=tuple(boxes))


def _extent(box: Sequence[float]) -> tuple[float, float]:
    return box[2] - box[0], box[3] - box[1]
