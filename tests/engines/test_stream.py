"""A stream end to end: an H.264 file through VideoSource, the demo model and the tracker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.pipeline import Sam3Pipeline
from engines.stream import StreamSession, draw_overlay, run_stream
from engines.video import VideoSource
from scenes.video import VideoOptions, generate_video, write_video

pytest.importorskip("av")
pytest.importorskip("trackers")


@pytest.fixture(scope="module")
def pipeline(shapes_bundle: Path):
    pipe = Sam3Pipeline.from_bundle(shapes_bundle, "onnxruntime")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    scene = generate_video(11, VideoOptions(frames=16))
    path = tmp_path_factory.mktemp("stream") / "clip.mp4"
    truth = write_video(scene, path)
    return path, scene, truth


def test_every_frame_becomes_an_event_with_stable_ids(pipeline, clip) -> None:
    path, scene, truth = clip
    session = StreamSession(scene.kinds(), frame_rate=10)
    events = list(run_stream(pipeline, VideoSource(str(path), realtime=False, every_frame=True), session))
    assert [e.index for e in events] == list(range(16))
    assert all("image_encoder" in e.timings_ms and "track" in e.timings_ms for e in events)
    # The demo model finds most objects: every tracked box lies on a true object of its prompt,
    # and an id, once given, stays on one object.
    owner: dict[int, int] = {}
    found = 0
    for event, objects in zip(events, truth):
        for track in event.tracks:
            best = max(objects, key=lambda o: _iou(o.box, track.box), default=None)
            if best is None or _iou(best.box, track.box) < 0.5:
                continue
            found += 1
            assert best.category == track.prompt or track.prompt == best.shape
            assert owner.setdefault(track.track_id, best.track_id) == best.track_id
    assert found >= 0.5 * sum(len([o for o in objs if not o.ignore]) for objs in truth)


def test_an_event_as_json_and_as_an_overlay(pipeline, clip) -> None:
    path, scene, _ = clip
    session = StreamSession(scene.kinds(), frame_rate=10)
    source = VideoSource(str(path), realtime=False, every_frame=True)
    try:
        frame = source.next_frame(5.0)
        assert frame is not None
        session.step(pipeline, frame)
        event = session.step(pipeline, source.next_frame(5.0))
    finally:
        source.close()
    doc = event.to_json("rle")
    assert doc["frame"] == 1 and doc["size"] == {"height": 240, "width": 320} and doc["tracks"]
    track = doc["tracks"][0]
    assert set(track) == {"track_id", "prompt", "score", "box", "mask"} and track["mask"]["format"] == "rle"
    assert event.to_json()["tracks"][0]["mask"] is None
    overlay = draw_overlay(frame.rgb, event)
    assert overlay.shape == frame.rgb.shape and not np.array_equal(overlay, frame.rgb)


def test_a_new_frame_size_resets_the_ids(pipeline, clip) -> None:
    path, scene, _ = clip
    session = StreamSession(scene.kinds(), frame_rate=10)
    source = VideoSource(str(path), realtime=False, every_frame=True)
    try:
        first = source.next_frame(5.0)
        session.step(pipeline, first)
    finally:
        source.close()
    from engines.video import Frame

    smaller = Frame(1, 0.1, first.rgb[:200, :300].copy())
    assert session.step(pipeline, smaller).reset


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 0.0
