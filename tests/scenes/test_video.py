"""Moving scenes: seeded, written as real H.264 files, with per-frame truth that keeps identities."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from scenes.video import VideoOptions, generate_video, write_video, write_video_set

av = pytest.importorskip("av")


def test_a_video_is_a_pure_function_of_its_seed() -> None:
    a, b = generate_video(3), generate_video(3)
    assert a.tracks == b.tracks
    for index in (0, 17, 39):
        (ra, ta), (rb, tb) = a.render(index), b.render(index)
        assert np.array_equal(ra, rb) and [o.track_id for o in ta] == [o.track_id for o in tb]
    assert generate_video(4).tracks != a.tracks


def test_objects_move_and_keep_their_ids() -> None:
    scene = generate_video(5)
    _, first = scene.render(0)
    _, later = scene.render(10)
    before, after = {o.track_id: o.box for o in first}, {o.track_id: o.box for o in later}
    common = set(before) & set(after)
    assert common, "some object is in view at frames 0 and 10"
    assert any(before[k] != after[k] for k in common)


def test_truth_is_the_visible_part_and_slivers_are_ignored() -> None:
    options = VideoOptions(frames=60, objects=(5, 5), entering=1.0)
    entering = [generate_video(seed, options) for seed in range(6)]
    ignored = [o for scene in entering for i in range(0, 60, 3) for o in scene.render(i)[1] if o.ignore]
    assert ignored, "objects entering from an edge are slivers at first"
    for obj in ignored[:5]:
        assert obj.mask.any()
    scene = entering[0]
    late = [t for t in scene.tracks if t.first > 0]
    assert late and all(t.track_id not in {o.track_id for o in scene.render(0)[1]} for t in late)
    # Visible parts never overlap: a covered pixel belongs to the object on top only.
    for index in range(0, 60, 7):
        masks = [o.mask for o in scene.render(index)[1]]
        if len(masks) > 1:
            assert int(np.sum(masks, axis=0).max()) == 1


def test_written_video_decodes_to_its_frames(tmp_path: Path) -> None:
    options = VideoOptions(frames=12)
    scene = generate_video(1, options)
    truth = write_video(scene, tmp_path / "v.mp4")
    assert len(truth) == 12 and not list(tmp_path.glob(".*partial"))
    with av.open(str(tmp_path / "v.mp4")) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and float(stream.average_rate) == options.fps
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == 12 and frames[0].shape == (240, 320, 3)
    # Lossy, but the same picture: the mean error of H.264 at crf 23 on flat shapes is small.
    assert float(np.abs(frames[5].astype(int) - scene.render(5)[0].astype(int)).mean()) < 4.0


def test_a_set_writes_video_and_truth_pairs(tmp_path: Path) -> None:
    paths = write_video_set(tmp_path, 2, seed=9, options=VideoOptions(frames=6))
    assert [p.name for p in paths] == ["000.mp4", "001.mp4"]
    doc = json.loads((tmp_path / "000.json").read_text())
    assert doc["seed"] == 9 and len(doc["frames"]) == 6
    ids = {t["track_id"] for t in doc["tracks"]}
    assert all(o["track_id"] in ids and len(o["box"]) == 4 for frame in doc["frames"] for o in frame)


def test_odd_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="even"):
        generate_video(0, VideoOptions(size=(321, 240)))
