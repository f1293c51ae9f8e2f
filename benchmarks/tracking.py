"""Tracking accuracy and stream throughput on generated moving scenes (scenes/video.py).

Accuracy: each video is played from its H.264 file through :class:`engines.video.VideoSource`
(every frame, as fast as it decodes) into one :class:`engines.stream.StreamSession` holding a
prompt for every kind in the video, as a user would ask. Text mode prompts the kinds by name;
box mode draws one box per kind on the first frame (kinds that enter later get no box, so box
mode leaves them out). Each (video,
prompt) pair is one sequence: its ground truth is every object of that kind, its output that
prompt's tracks. CLEAR (MOTA, ID switches) and Identity (IDF1) metrics come from Roboflow's
``trackers.eval`` (TrackEval's matching and formulas), box IoU >= 0.5, summed over sequences.

Throughput: N streams of the same video, each a real-time source at the file's frame rate
(latest-frame policy), share one pipeline the way the server's one inference worker shares it:
round robin, one frame at a time. Reported per stream: processed FPS, dropped frames, and the
per-frame latency (frame decoded -> event ready).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from engines.stream import StreamSession
from engines.tracking import TrackerOptions
from engines.types import ExemplarBox, Prompt
from engines.video import VideoSource

if TYPE_CHECKING:
    from engines.pipeline import Sam3Pipeline

MODES = ("text", "box")


@dataclass(frozen=True)
class TrackingConfig:
    score_threshold: float = TrackerOptions.score_threshold
    low_threshold: float = TrackerOptions.low_threshold
    iou_threshold: float = 0.5
    lost_track_s: float = TrackerOptions.lost_track_s
    confirm_frames: int = TrackerOptions.confirm_frames

    @classmethod
    def starting_at(cls, score_threshold: float) -> "TrackingConfig":
        """The server's rule (``TrackerOptions.starting_at``) for a score threshold."""
        start = TrackerOptions.starting_at(score_threshold)
        return cls(score_threshold=start.score_threshold, low_threshold=start.low_threshold)

    def tracker(self) -> TrackerOptions:
        return TrackerOptions(score_threshold=self.score_threshold, low_threshold=self.low_threshold,
                              lost_track_s=self.lost_track_s, confirm_frames=self.confirm_frames)


def load_truth(video: Path) -> dict[str, Any]:
    truth: dict[str, Any] = json.loads(video.with_suffix(".json").read_text())
    return truth


def _prompts(truth: dict[str, Any], mode: str) -> tuple[list[str | Prompt], list[str]]:
    """The stream's prompts and, per prompt, the category it asks for."""
    categories = {t["track_id"]: t["category"] for t in truth["tracks"]}
    kinds = list(dict.fromkeys(categories.values()))
    if mode == "text":
        return list(kinds), kinds
    first = [o for o in truth["frames"][0] if not o["ignore"]]
    prompts: list[str | Prompt] = []
    asked: list[str] = []
    for kind in kinds:
        drawn = next((o for o in first if categories[o["track_id"]] == kind), None)
        if drawn is not None:
            x0, y0, x1, y1 = (float(v) for v in drawn["box"])
            prompts.append(Prompt(boxes=(ExemplarBox((x0, y0, x1, y1)),)))
            asked.append(kind)
    return prompts, asked


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from trackers.eval.box import box_iou

    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    return np.asarray(box_iou(a, b), dtype=np.float64)


def track_video(pipeline: Sam3Pipeline, video: Path, mode: str, config: TrackingConfig) -> list[dict[str, Any]]:
    """One video through one stream -> one sequence per prompt: per frame the ground-truth ids
    and boxes of the prompt's kind, and the prompt's track ids and boxes."""
    truth = load_truth(video)
    categories = {t["track_id"]: t["category"] for t in truth["tracks"]}
    prompts, asked = _prompts(truth, mode)
    if not prompts:
        return []
    fps = float(truth["options"]["fps"])
    session = StreamSession(prompts, frame_rate=fps, tracker=config.tracker(), with_masks=False)
    source = VideoSource(str(video), realtime=False, every_frame=True)
    sequences: list[dict[str, Any]] = [{"video": video.name, "kind": kind, "frames": []} for kind in asked]
    try:
        while (frame := source.next_frame(30.0)) is not None:
            event = session.step(pipeline, frame)
            gt_frame = truth["frames"][frame.index]
            for index, kind in enumerate(asked):
                kind_objects = [o for o in gt_frame if categories[o["track_id"]] == kind]
                gt = [o for o in kind_objects if not o["ignore"]]
                ignored = np.asarray([o["box"] for o in kind_objects if o["ignore"]], dtype=np.float64)
                mine = [t for t in event.tracks if t.prompt_index == index]
                if len(ignored) and mine:  # a track on an ignored sliver is neither right nor wrong
                    overlap = _box_iou(np.asarray([t.box for t in mine], dtype=np.float64), ignored.reshape(-1, 4))
                    mine = [t for t, row in zip(mine, overlap) if row.max() < config.iou_threshold]
                sequences[index]["frames"].append({
                    "gt_ids": [o["track_id"] for o in gt], "gt_boxes": [o["box"] for o in gt],
                    "ids": [t.track_id for t in mine], "boxes": [list(t.box) for t in mine],
                })
        if source.state == "failed":
            raise RuntimeError(f"{video}: {source.reason}")
    finally:
        source.close()
    return sequences


def sequence_metrics(sequence: dict[str, Any], iou_threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
    from trackers.eval.clear import compute_clear_metrics
    from trackers.eval.identity import compute_identity_metrics

    gt_ids, ids, similarity = [], [], []
    for f in sequence["frames"]:
        gt_ids.append(np.asarray(f["gt_ids"], dtype=int))
        ids.append(np.asarray(f["ids"], dtype=int))
        similarity.append(_box_iou(np.asarray(f["gt_boxes"], dtype=np.float64).reshape(-1, 4),
                                   np.asarray(f["boxes"], dtype=np.float64).reshape(-1, 4)))
    return (compute_clear_metrics(gt_ids, ids, similarity, threshold=iou_threshold),
            compute_identity_metrics(gt_ids, ids, similarity, threshold=iou_threshold))


def evaluate_tracking(pipeline: Sam3Pipeline, videos: Sequence[Path], mode: str,
                      config: TrackingConfig = TrackingConfig()) -> dict[str, Any]:
    """MOTA, IDF1, ID switches (and their parts) over every (video, prompt) sequence."""
    from trackers.eval.clear import aggregate_clear_metrics
    from trackers.eval.identity import aggregate_identity_metrics

    if mode not in MODES:
        raise ValueError(f"mode is one of {MODES}")
    clear, identity = [], []
    started = time.perf_counter()
    frames = 0
    for video in videos:
        for sequence in track_video(pipeline, video, mode, config):
            c, i = sequence_metrics(sequence, config.iou_threshold)
            clear.append(c)
            identity.append(i)
            frames += len(sequence["frames"])
    if not clear:
        raise ValueError("no sequences to score")
    c, i = aggregate_clear_metrics(clear), aggregate_identity_metrics(identity)
    return {
        "mode": mode, "videos": len(videos), "sequences": len(clear), "config": asdict(config),
        "MOTA": float(c["MOTA"]), "IDF1": float(i["IDF1"]), "IDSW": int(c["IDSW"]),
        "recall": float(c["CLR_Re"]), "precision": float(c["CLR_Pr"]),
        "TP": int(c["CLR_TP"]), "FN": int(c["CLR_FN"]), "FP": int(c["CLR_FP"]),
        "mostly_tracked": int(c["MT"]), "mostly_lost": int(c["ML"]), "frag": int(c["Frag"]),
        "seconds": round(time.perf_counter() - started, 2),
    }  # fmt: skip


def stream_throughput(pipeline: Sam3Pipeline, video: Path, streams: int, seconds: float,
                      config: TrackingConfig = TrackingConfig()) -> dict[str, Any]:
    """``streams`` real-time copies of ``video`` sharing one pipeline, round robin, for
    ``seconds`` (or until every source ends)."""
    truth = load_truth(video)
    prompts, _ = _prompts(truth, "text")
    fps = float(truth["options"]["fps"])
    sources = [VideoSource(str(video), realtime=True) for _ in range(streams)]
    sessions = [StreamSession(prompts, frame_rate=fps, tracker=config.tracker()) for _ in range(streams)]
    processed = [0] * streams
    latency: list[list[float]] = [[] for _ in range(streams)]
    started = time.monotonic()
    try:
        while time.monotonic() - started < seconds and not all(s.finished for s in sources):
            idle = True
            for k, (source, session) in enumerate(zip(sources, sessions)):
                frame = source.next_frame(0.0)
                if frame is None:
                    continue
                idle = False
                # The frame was ready at its presentation time: latency counts the wait for the
                # worker too, as a stream in the server does.
                ready_at = started + frame.timestamp_s
                session.step(pipeline, frame)
                latency[k].append((time.monotonic() - ready_at) * 1e3)
                processed[k] += 1
            if idle:
                time.sleep(0.002)
        elapsed = time.monotonic() - started
    finally:
        for source in sources:
            source.close()
    return {
        "streams": streams, "seconds": round(elapsed, 2), "source_fps": fps,
        "per_stream": [
            {"processed_fps": round(processed[k] / elapsed, 2), "frames": processed[k],
             "dropped": sources[k].stats.dropped,
             "latency_ms_p50": round(float(np.percentile(latency[k], 50)), 1) if latency[k] else None,
             "latency_ms_p90": round(float(np.percentile(latency[k], 90)), 1) if latency[k] else None}
            for k in range(streams)
        ],
    }  # fmt: skip


def markdown(accuracy: Sequence[dict[str, Any]], throughput: Sequence[dict[str, Any]]) -> str:
    lines = ["| prompts | sequences | MOTA | IDF1 | ID switches | recall | precision | mostly tracked / lost |",
             "|---|---|---|---|---|---|---|---|"]
    for a in accuracy:
        lines.append(f"| {a['mode']} | {a['sequences']} | {a['MOTA']:.3f} | {a['IDF1']:.3f} | {a['IDSW']} | "
                     f"{a['recall']:.3f} | {a['precision']:.3f} | {a['mostly_tracked']} / {a['mostly_lost']} |")
    if throughput:
        lines += ["", "| streams | processed FPS per stream | dropped frames per stream | latency p50 / p90 (ms) |",
                  "|---|---|---|---|"]
        for t in throughput:
            per = t["per_stream"]
            fps = " / ".join(f"{p['processed_fps']:.1f}" for p in per)
            dropped = " / ".join(str(p["dropped"]) for p in per)
            lat = " / ".join(f"{p['latency_ms_p50']}-{p['latency_ms_p90']}" for p in per)
            lines.append(f"| {t['streams']} | {fps} | {dropped} | {lat} |")
    return "\n".join(lines) + "\n"
