"""VideoSource: PyAV on its own thread, newest frame first, every failure a state with a reason."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from engines.video import VideoSource
from scenes.video import VideoOptions, generate_video, write_video

pytest.importorskip("av")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(generate_video(2, VideoOptions(frames=20, fps=20)), path)
    return path


def _drain(source: VideoSource, delay_s: float = 0.0) -> list[int]:
    seen = []
    while (frame := source.next_frame(5.0)) is not None:
        seen.append(frame.index)
        time.sleep(delay_s)
    return seen


def test_every_frame_mode_delivers_each_frame_in_order(clip: Path) -> None:
    source = VideoSource(str(clip), realtime=False, every_frame=True)
    try:
        assert _drain(source) == list(range(20))
        assert source.state == "ended" and source.finished and source.stats.dropped == 0
        assert source.fps == 20.0
    finally:
        source.close()


def test_a_slow_consumer_gets_the_newest_frame_and_drops_are_counted(clip: Path) -> None:
    source = VideoSource(str(clip), realtime=True)  # 20 FPS, consumed at ~5
    try:
        seen = _drain(source, delay_s=0.2)
    finally:
        source.close()
    assert seen == sorted(seen) and len(seen) < 20 and seen[-1] >= 15
    assert source.stats.dropped == 20 - len(seen)


def test_frames_carry_their_presentation_time(clip: Path) -> None:
    source = VideoSource(str(clip), realtime=False, every_frame=True)
    try:
        first, second = source.next_frame(5.0), source.next_frame(5.0)
    finally:
        source.close()
    assert first is not None and second is not None
    assert first.timestamp_s == 0.0 and second.timestamp_s == pytest.approx(0.05)
    assert first.size == (240, 320) and first.rgb.dtype.name == "uint8"


@pytest.mark.parametrize("kind", ["missing", "not a video"])
def test_a_bad_source_fails_with_a_reason(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.mp4"
    if kind == "not a video":
        path.write_bytes(b"this is text, not H.264" * 40)
    source = VideoSource(str(path))
    try:
        assert source.next_frame(5.0) is None
    finally:
        source.close()
    assert source.state == "failed" and source.reason


def test_frames_over_the_pixel_limit_fail_the_source(clip: Path) -> None:
    source = VideoSource(str(clip), realtime=False, max_pixels=320 * 200)
    try:
        assert source.next_frame(5.0) is None
    finally:
        source.close()
    assert source.state == "failed" and "megapixels" in (source.reason or "")


def test_close_stops_the_reader_at_once(clip: Path) -> None:
    source = VideoSource(str(clip), realtime=True)
    assert source.next_frame(5.0) is not None
    started = time.monotonic()
    source.close()
    assert time.monotonic() - started < 2.0 and source.state == "closed"
    assert not source._thread.is_alive() and source.next_frame(0.1) is None
