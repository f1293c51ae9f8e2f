"""Live streams through a real server: file and HTTP sources, the SSE feed, the MJPEG overlay,
bad and forbidden sources, limits, and clients that leave."""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import httpx
import numpy as np
import pytest

from scenes.video import VideoOptions, generate_video, write_video
from tests.server.conftest import SERVER_ENV, ServerProcess

av = pytest.importorskip("av")
pytest.importorskip("trackers")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_video(generate_video(11, VideoOptions(frames=20)), root / "short.mp4")  # 2 s at 10 FPS
    write_video(generate_video(12, VideoOptions(frames=300)), root / "long.mp4")  # 30 s
    write_video(generate_video(12, VideoOptions(frames=300)), root / "long.ts")  # streamable
    (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"not really a video" * 200)
    # A broadcast whose resolution changes half-way: two MPEG-TS files back to back.
    write_video(generate_video(13, VideoOptions(frames=10)), root / "a.ts")
    write_video(generate_video(14, VideoOptions(frames=10, size=(160, 120))), root / "b.ts")
    (root / "resized.ts").write_bytes((root / "a.ts").read_bytes() + (root / "b.ts").read_bytes())
    (tmp_path_factory.getbasetemp() / "outside.mp4").write_bytes((root / "short.mp4").read_bytes())
    return root


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class _Stalling(http.server.BaseHTTPRequestHandler):
    """Sends a third of a streamable video, then nothing: a source that stalls mid-way."""

    body = b""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body[: len(self.body) // 3])
        self.wfile.flush()
        time.sleep(20)

    def log_message(self, *args: Any) -> None:
        pass


def _serve(handler: Any) -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def file_server(media: Path) -> Iterator[str]:
    handler = type("Files", (_Files,), {"__init__": lambda self, *a, **k: _Files.__init__(self, *a, directory=str(media), **k)})
    yield from _serve(handler)


@pytest.fixture(scope="module")
def stalling_server(media: Path) -> Iterator[str]:
    yield from _serve(type("Stall", (_Stalling,), {"body": (media / "long.ts").read_bytes()}))


@pytest.fixture(scope="module")
def stream_server(server_bundle: Path, media: Path, tmp_path_factory) -> Iterator[ServerProcess]:
    env = {**SERVER_ENV, "SAM3_MEDIA_DIR": str(media), "SAM3_STREAM_ALLOWED_HOSTS": "127.0.0.1",
           "SAM3_MAX_STREAMS": "2", "SAM3_STREAM_MAX_FPS": "20", "SAM3_STREAM_TIMEOUT_S": "3"}
    proc = ServerProcess(server_bundle, env, tmp_path_factory.mktemp("stream-logs"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture()
def api(stream_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stream_server.url, timeout=30.0) as client:
        yield client
        for stream in client.get("/streams").json()["streams"]:
            client.delete(f"/streams/{stream['id']}")


def _start(api: httpx.Client, source: dict[str, str], **extra: Any) -> dict[str, Any]:
    response = api.post("/streams", json={"source": source, "prompts": ["red circle", "square"], **extra})
    assert response.status_code == 201, response.text
    return response.json()


def _events(api: httpx.Client, stream_id: str, limit: int = 10**6) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    frames, end = [], None
    with api.stream("GET", f"/streams/{stream_id}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if kind == "end":
                    end = data
                    break
                frames.append(data)
                if len(frames) >= limit:
                    break
    return frames, end


def _wait_state(api: httpx.Client, stream_id: str, states: tuple[str, ...], timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = api.get(f"/streams/{stream_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.1)
    raise AssertionError(f"stream {stream_id} never reached {states}: {body}")


def test_a_file_plays_to_its_end_with_every_event_in_order(api: httpx.Client) -> None:
    stream = _start(api, {"file": "short.mp4"}, mask_format="rle")
    assert stream["state"] in ("starting", "running") and stream["source"] == {"kind": "file", "value": "short.mp4"}
    frames, end = _events(api, stream["id"])
    assert end == {"state": "ended", "reason": "the source ended"}
    indexes = [f["frame"] for f in frames]
    assert indexes == sorted(indexes) and len(indexes) >= 5 and indexes[-1] >= 15
    event = frames[-1]
    assert event["stream_id"] == stream["id"] and event["size"] == {"height": 240, "width": 320}
    for track in (t for f in frames for t in f["tracks"]):
        assert track["prompt"] in ("red circle", "square") and len(track["box"]) == 4
        assert track["mask"]["format"] == "rle"
    body = api.get(f"/streams/{stream['id']}").json()
    assert body["state"] == "ended" and body["stats"]["frames_processed"] == len(frames)
    assert body["stats"]["subscribers"] == 0
    assert api.delete(f"/streams/{stream['id']}").status_code == 200
    assert api.get(f"/streams/{stream['id']}").json()["error"]["code"] == "stream_not_found"


def test_a_source_that_changes_resolution_restarts_its_tracks(api: httpx.Client) -> None:
    stream = _start(api, {"file": "resized.ts"})
    frames, end = _events(api, stream["id"])
    assert end is not None and end["state"] == "ended"
    sizes = [(f["size"]["width"], f["size"]["height"]) for f in frames]
    assert sizes[0] == (320, 240) and sizes[-1] == (160, 120)
    assert [f["reset"] for f in frames].count(True) == 1
    assert frames[sizes.index((160, 120))]["reset"]


def test_an_http_source_served_here(api: httpx.Client, file_server: str) -> None:
    stream = _start(api, {"url": f"{file_server}/short.mp4"})
    frames, end = _events(api, stream["id"])
    assert end is not None and end["state"] == "ended" and frames
    assert api.get(f"/streams/{stream['id']}").json()["source"]["value"] == f"{file_server}/short.mp4"


def test_the_mjpeg_overlay_is_a_live_jpeg_sequence(api: httpx.Client) -> None:
    stream = _start(api, {"file": "long.mp4"})
    parts = []
    with api.stream("GET", f"/streams/{stream['id']}/mjpeg") as response:
        assert response.headers["content-type"] == "multipart/x-mixed-replace; boundary=frame"
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            while b"\r\n\r\n" in buffer:
                head, rest = buffer.split(b"\r\n\r\n", 1)
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                if len(rest) < length + 2:
                    break
                parts.append(rest[:length])
                buffer = rest[length + 2:]
            if len(parts) >= 3:
                break
    image = cv2.imdecode(np.frombuffer(parts[-1], np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (240, 320, 3)
    # The feed closed with the client: the stream has no subscriber left.
    deadline = time.monotonic() + 5
    while api.get(f"/streams/{stream['id']}").json()["stats"]["subscribers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert api.get(f"/streams/{stream['id']}").json()["stats"]["subscribers"] == 0


def test_a_client_that_leaves_the_feed_frees_it_and_the_stream_goes_on(api: httpx.Client) -> None:
    stream = _start(api, {"file": "long.mp4"})
    frames, _ = _events(api, stream["id"], limit=2)
    assert len(frames) == 2
    deadline = time.monotonic() + 5
    while api.get(f"/streams/{stream['id']}").json()["stats"]["subscribers"] and time.monotonic() < deadline:
        time.sleep(0.1)
    body = api.get(f"/streams/{stream['id']}").json()
    assert body["stats"]["subscribers"] == 0 and body["state"] == "running"
    metrics = api.get("/metrics").text
    assert f'sam3_stream_frames_processed_total{{stream="{stream["id"]}"}}' in metrics
    stopped = api.delete(f"/streams/{stream['id']}").json()
    assert stopped["state"] == "stopped" and stopped["reason"] == "stopped by request"


def test_streams_are_limited_and_hold_admission(api: httpx.Client) -> None:
    first = _start(api, {"file": "long.mp4"})
    _start(api, {"file": "long.mp4"})
    refused = api.post("/streams", json={"source": {"file": "long.mp4"}, "prompts": ["circle"]})
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_streams"
    assert api.get("/info").json()["admission"]["in_flight"] == 2
    api.delete(f"/streams/{first['id']}")
    assert api.get("/info").json()["admission"]["in_flight"] == 1
    _start(api, {"file": "long.mp4"})


@pytest.mark.parametrize(
    ("source", "status", "code"),
    [
        ({"file": "../outside.mp4"}, 403, "source_not_allowed"),
        ({"file": "missing.mp4"}, 422, "invalid_source"),
        ({"url": "http://10.1.2.3/cam.mp4"}, 403, "source_not_allowed"),
        ({"url": "rtsp://user:secret@192.168.0.9/live"}, 403, "source_not_allowed"),
        ({"url": "ftp://127.0.0.1/x.mp4"}, 422, "validation_error"),
        ({"device": "/dev/video0"}, 403, "source_not_allowed"),
        ({"file": "short.mp4", "url": "http://127.0.0.1/x"}, 422, "invalid_source"),
    ],
)
def test_forbidden_and_malformed_sources_are_refused(api: httpx.Client, source: dict, status: int, code: str) -> None:
    response = api.post("/streams", json={"source": source, "prompts": ["circle"]})
    assert response.status_code == status and response.json()["error"]["code"] == code, response.text
    assert "secret" not in response.text


def test_bad_prompts_are_refused_before_anything_opens(api: httpx.Client) -> None:
    response = api.post("/streams", json={"source": {"file": "short.mp4"}, "prompts": ["  "]})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_prompt"
    assert api.get("/streams").json()["streams"] == []


@pytest.mark.parametrize("kind", ["broken file", "unreachable", "stalls"])
def test_a_source_that_fails_ends_the_stream_with_a_reason(api: httpx.Client, kind: str, stalling_server: str) -> None:
    if kind == "broken file":
        source = {"file": "broken.mp4"}
    elif kind == "unreachable":
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        source = {"url": f"http://127.0.0.1:{port}/cam.mp4"}
    else:
        source = {"url": f"{stalling_server}/long.ts"}
    stream = _start(api, source)
    body = _wait_state(api, stream["id"], ("failed", "ended"), timeout_s=30)
    assert body["state"] == "failed" and body["reason"]
    if kind == "stalls":  # frames came, then nothing for SAM3_STREAM_TIMEOUT_S
        assert body["stats"]["frames_processed"] > 0 and body["reason"] == "stalled: no data for 3 s"
    frames, end = _events(api, stream["id"])
    assert frames == [] and end == {"state": body["state"], "reason": body["reason"]}


def test_a_box_outside_the_frame_fails_the_stream_on_its_first_frame(api: httpx.Client) -> None:
    response = api.post("/streams", json={"source": {"file": "short.mp4"},
                                          "prompts": [{"boxes": [[300, 200, 900, 700]]}]})
    assert response.status_code == 201, response.text
    body = _wait_state(api, response.json()["id"], ("failed",))
    assert body["reason"].startswith("invalid_box")


def test_unknown_ids_are_404_and_malformed_ones_422(api: httpx.Client) -> None:
    stream = _start(api, {"file": "long.mp4"})
    assert api.get(f"/streams/{stream['id']}").status_code == 200
    assert api.get("/streams/0123456789abcdef").status_code == 404
    assert api.get("/streams/not-an-id").status_code == 422


def test_the_client_prints_events_and_stops_the_stream(stream_server: ServerProcess, api: httpx.Client,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from clients.__main__ import main

    events = tmp_path / "events.jsonl"
    assert main(["stream", stream_server.url, "long.mp4", "red circle", "--frames", "3", "--json", str(events)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("stream ") and out.count("\nframe ") == 3 and "stopped: stopped by request" in out
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(lines) == 3 and all("tracks" in line for line in lines)
    assert all(s["state"] != "running" for s in api.get("/streams").json()["streams"])


def test_the_client_records_the_overlay(stream_server: ServerProcess, tmp_path: Path) -> None:
    from clients.__main__ import main

    video = tmp_path / "annotated.mp4"
    assert main(["stream", stream_server.url, "long.mp4", "--box", "10,10,80,80", "--frames", "4",
                 "--out", str(video)]) == 0
    with av.open(str(video)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 4 and (frames[0].width, frames[0].height) == (320, 240)


def test_the_client_reports_a_refused_source(stream_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    from clients.__main__ import main

    assert main(["stream", stream_server.url, "http://10.9.9.9/cam", "person"]) == 1
    assert "source_not_allowed" in capsys.readouterr().err


def test_the_demo_page_shows_a_live_overlay_and_stops_it(stream_server: ServerProcess, api: httpx.Client) -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright==1.65.2")
    from tests.server.test_demo_browser import ARGS, CHROMIUM

    if not (Path(CHROMIUM).exists()):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(stream_server.url + "/")
            page.fill("#streamsource", "long.mp4")
            page.fill("#streamprompts", "red circle, square")
            page.click("#streamstart")
            # Frames keep arriving: the overlay image is replaced several times.
            page.wait_for_function("Number(document.getElementById('streamview').dataset.frames || 0) >= 3",
                                   timeout=20_000)
            size = page.eval_on_selector("#streamview", "img => [img.naturalWidth, img.naturalHeight]")
            assert size == [320, 240]
            page.wait_for_function("document.getElementById('streamstatus').textContent.startsWith('running')",
                                   timeout=10_000)
            stream_id = page.eval_on_selector("#streamview", "img => img.dataset.stream")
            page.click("#streamstop")
            page.wait_for_function("document.getElementById('streamstatus').textContent.startsWith('stopped')",
                                   timeout=10_000)
        finally:
            browser.close()
    assert api.get(f"/streams/{stream_id}").status_code == 404  # stopped and forgotten
