"""Admission before work, quiet disconnects, slow senders cut off: raw sockets against a real server.

- A request takes one of SAM3_QUEUE_SIZE slots before its body is read; a full server answers
  429 at once, having read the headers only (here the body is never even sent).
- A client that aborts its upload is one info line and status 499 in the metrics, never a 500
  or a traceback.
- Headers that do not complete within SAM3_HEADER_TIMEOUT_S close the connection; a body that
  does not arrive within SAM3_BODY_TIMEOUT_S gets 408 and the connection is closed.
"""

from __future__ import annotations

import json
import re
import socket
import statistics
import time

import httpx
import pytest

from tests.server.conftest import ServerProcess, image_bytes

BOUNDARY = "sam3boundary"


def open_upload(url: str, length: int, sent: bytes = b"") -> socket.socket:
    """A POST /segment whose headers announce ``length`` bytes of body, of which ``sent`` are sent."""
    host, port = url.rsplit("/", 1)[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = (
        f"POST /segment HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
    )
    sock.sendall(head.encode() + sent)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (reading and discarding what it sends)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    while True:
        try:
            if not sock.recv(65536):
                return time.monotonic() - started
        except ConnectionResetError:
            return time.monotonic() - started


def part_header() -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()


def in_flight(url: str) -> int:
    return int(httpx.get(f"{url}/info").json()["admission"]["in_flight"])


def test_a_full_server_answers_429_at_once_without_reading_the_body(server_bundle, tmp_path) -> None:
    proc = ServerProcess(server_bundle, {"SAM3_QUEUE_SIZE": "2", "SAM3_BODY_TIMEOUT_S": "120"}, tmp_path)
    stalled: list[socket.socket] = []
    try:
        proc.wait_ready()
        # Two uploads that never finish hold both slots (a slow network looks the same).
        for _ in range(2):
            stalled.append(open_upload(proc.url, 10_000_000, part_header() + b"\xff\xd8" + b"x" * 1000))
        deadline = time.monotonic() + 20
        while in_flight(proc.url) < 2:
            assert time.monotonic() < deadline, "the stalled uploads were never admitted"
            time.sleep(0.02)
        latencies = []
        for _ in range(20):
            sock = open_upload(proc.url, 20_000_000)  # headers only: the 20 MB are never sent
            started = time.perf_counter()
            code, headers, body = read_response(sock)
            latencies.append(time.perf_counter() - started)
            sock.close()
            assert code == 429 and int(headers["retry-after"]) >= 1
            assert json.loads(body)["error"]["code"] == "queue_full"
        print(f"\n429 latency: median {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
        assert statistics.median(latencies) <= 0.050
        assert max(latencies) <= 1.0
        # Probes and /info are not queued work: they answer while the server is full.
        assert httpx.get(f"{proc.url}/readyz").status_code == 200
        for sock in stalled:
            sock.close()
        deadline = time.monotonic() + 20
        while in_flight(proc.url) > 0:  # the aborted uploads give their slots back
            assert time.monotonic() < deadline, "slots of aborted uploads were not released"
            time.sleep(0.02)
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            ok = c.post("/segment", files={"image": ("a.jpg", image_bytes(seed=3), "image/jpeg")}, data={"prompt": "cat"})
            assert ok.status_code == 200
            metrics = c.get("/metrics").text
        assert 'sam3_rejected_requests_total{reason="queue_full"} 20.0' in metrics
    finally:
        for sock in stalled:
            sock.close()
        proc.stop()


@pytest.fixture(scope="module")
def strict_server(server_bundle, tmp_path_factory):
    env = {"SAM3_HEADER_TIMEOUT_S": "1", "SAM3_BODY_TIMEOUT_S": "2", "SAM3_LOG_LEVEL": "info"}
    proc = ServerProcess(server_bundle, env, tmp_path_factory.mktemp("strict"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_an_aborted_upload_is_an_info_line_and_a_499(strict_server) -> None:
    url = strict_server.url
    for i in range(5):
        sock = open_upload(url, 2_000_000, part_header() + b"\xff\xd8" + b"y" * 50_000)
        time.sleep(0.1)
        sock.close()  # mid-upload
    deadline = time.monotonic() + 20
    while True:
        metrics = httpx.get(f"{url}/metrics").text
        if 'sam3_rejected_requests_total{reason="client_closed"} 5.0' in metrics:
            break
        assert time.monotonic() < deadline, metrics[-2000:]
        time.sleep(0.05)
    assert re.search(r'sam3_request_duration_seconds_count\{method="POST",route="/segment",status="499"\} 5\.0', metrics)
    assert 'status="500"' not in metrics
    log = strict_server.log()
    assert log.count("client closed the connection during POST /segment") >= 5
    assert "Traceback" not in log and " ERROR " not in log and "Exception in ASGI" not in log
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_slow_headers_are_closed(strict_server) -> None:
    host, port = strict_server.url.rsplit("/", 1)[1].split(":")
    idle = socket.create_connection((host, int(port)))
    trickle = socket.create_connection((host, int(port)))
    trickle.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
    assert closed_within(idle, 10) < 5
    assert closed_within(trickle, 10) < 5
    # A complete request on a kept-alive connection is not cut by the header deadline.
    with httpx.Client(base_url=strict_server.url, timeout=30) as c:
        for _ in range(3):
            assert c.get("/healthz").status_code == 200
            time.sleep(0.6)


def test_a_slow_body_gets_408_and_the_connection_is_closed(strict_server) -> None:
    sock = open_upload(strict_server.url, 100_000, part_header() + b"\xff\xd8")
    started = time.monotonic()
    code, headers, body = read_response(sock)
    assert code == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert 1.5 < time.monotonic() - started < 10
    assert headers.get("connection") == "close"
    assert closed_within(sock, 10) < 5
    metrics = httpx.get(f"{strict_server.url}/metrics").text
    assert 'sam3_rejected_requests_total{reason="body_timeout"}' in metrics
