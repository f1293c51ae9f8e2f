"""StreamTracker: ByteTrack per prompt gives stable ids; box prompts follow their object."""

from __future__ import annotations

import pytest

from engines.tracking import StreamTracker, TrackerOptions
from engines.types import Detection, ExemplarBox, Prompt, PromptResult

pytest.importorskip("trackers")

SIZE = (240, 320)


def _result(prompt: str, *dets: tuple[float, tuple[float, float, float, float]]) -> PromptResult:
    return PromptResult(prompt, tuple(Detection(score, box) for score, box in dets))


def _moving(x: float) -> tuple[float, float, float, float]:
    return (x, 50.0, x + 40.0, 90.0)


def test_an_object_keeps_its_id_while_it_moves_and_through_a_weak_frame() -> None:
    tracker = StreamTracker(["red circle"], frame_rate=10)
    ids = []
    for step in range(12):
        score = 0.3 if step == 6 else 0.9  # one weak frame: ByteTrack's second stage keeps the track
        tracked = tracker.update([_result("red circle", (score, _moving(10 + 5 * step)))], SIZE)
        ids.append([t.track_id for t in tracked])
    assert ids[0] == [] and all(i == [1] for i in ids[1:])  # confirmed on the second frame


def test_a_low_score_detection_never_starts_a_track() -> None:
    tracker = StreamTracker(["red circle"], frame_rate=10)
    for step in range(5):
        assert tracker.update([_result("red circle", (0.3, _moving(10 + 5 * step)))], SIZE) == []


def test_ids_are_unique_across_prompts_and_objects() -> None:
    tracker = StreamTracker(["red circle", "blue square"], frame_rate=10)
    for step in range(4):
        tracked = tracker.update([
            _result("red circle", (0.9, _moving(10 + 5 * step)), (0.8, (200.0, 150.0, 240.0, 190.0))),
            _result("blue square", (0.9, _moving(12 + 5 * step))),  # overlaps the red one: another prompt
        ], SIZE)
    assert sorted(t.track_id for t in tracked) == [1, 2, 3]
    assert {t.prompt for t in tracked if t.prompt_index == 1} == {"blue square"}


def test_a_box_prompt_follows_its_object_and_stays_in_the_frame() -> None:
    drawn = Prompt(boxes=(ExemplarBox((10.0, 50.0, 50.0, 90.0)),))
    tracker = StreamTracker([drawn], frame_rate=10)
    assert tracker.prompts_for_next_frame() == [drawn]
    for step in range(6):
        tracker.update([_result("visual", (0.9, _moving(10 + 20 * step)))], SIZE)
    (moved,) = tracker.prompts_for_next_frame()
    assert moved.boxes[0].box == (110.0, 50.0, 150.0, 90.0)
    tracker.update([_result("visual", (0.9, (290.0, 50.0, 335.0, 90.0)))], SIZE)  # reaches past the edge
    x0, _, x1, _ = tracker.prompts_for_next_frame()[0].boxes[0].box
    assert x1 <= 320 and x0 < x1
    tracker.reset()  # a new frame size: back to the drawn box, ids forgotten
    assert tracker.prompts_for_next_frame() == [drawn]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="low_threshold"):
        StreamTracker(["a"], frame_rate=10, options=TrackerOptions(score_threshold=0.3, low_threshold=0.5))
    with pytest.raises(ValueError, match="results for"):
        StreamTracker(["a", "b"], frame_rate=10).update([_result("a")], SIZE)
