"""Tracking accuracy of the shipped demo model on generated videos, through the same VideoSource
and StreamSession the server uses (bounds a little below the measured figures)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import tracking
from engines.pipeline import Sam3Pipeline
from scenes.video import VideoOptions, write_video_set

pytest.importorskip("av")
pytest.importorskip("trackers")

# Measured on these 4 videos (seed 21, 30 frames) with models/shapes: text MOTA 0.680, IDF1 0.813,
# 2 ID switches; one box per kind on the first frame MOTA 0.292, IDF1 0.654. Four short videos
# move by whole objects: the box figure was 0.708 with the previous model and is 0.292 now
# because two of its 7 sequences (video 002) lost their object and followed another (45 false
# positives), while on the 20-video benchmark (benchmarks/RESULTS.md, what is reported) box MOTA
# rose 0.308 -> 0.414. A broken box path scores 0 or below.
TEXT_BOUNDS = {"MOTA": 0.5, "IDF1": 0.7}
BOX_BOUNDS = {"MOTA": 0.2, "IDF1": 0.6}


@pytest.fixture(scope="module")
def results(shapes_bundle: Path, tmp_path_factory) -> dict[str, dict]:
    videos = write_video_set(tmp_path_factory.mktemp("videos"), 4, seed=21, options=VideoOptions(frames=30))
    pipeline = Sam3Pipeline.from_bundle(shapes_bundle, "onnxruntime")
    try:
        return {mode: tracking.evaluate_tracking(pipeline, videos, mode) for mode in tracking.MODES}
    finally:
        pipeline.close()


def test_text_prompts_track_with_stable_ids(results) -> None:
    text = results["text"]
    assert text["sequences"] >= 8 and text["TP"] > 0
    for name, bound in TEXT_BOUNDS.items():
        assert text[name] >= bound, text


def test_a_box_on_the_first_frame_is_tracked(results) -> None:
    box = results["box"]
    for name, bound in BOX_BOUNDS.items():
        assert box[name] >= bound, box


def test_a_model_that_sees_nothing_scores_nothing(tmp_path: Path) -> None:
    """The metric can fail: a tracker output with no tracks has MOTA 0 and IDF1 0."""
    sequence = {"frames": [{"gt_ids": [1], "gt_boxes": [[0, 0, 10, 10]], "ids": [], "boxes": []}] * 5}
    clear, identity = tracking.sequence_metrics(sequence, 0.5)
    assert clear["MOTA"] == 0.0 and identity["IDF1"] == 0.0 and clear["CLR_FN"] == 5
    wrong = {"frames": [{"gt_ids": [1], "gt_boxes": [[0, 0, 10, 10]], "ids": [k], "boxes": [[0, 0, 10, 10]]}
                        for k in (1, 2, 1, 2)]}
    clear, _ = tracking.sequence_metrics(wrong, 0.5)
    assert clear["IDSW"] == 3
