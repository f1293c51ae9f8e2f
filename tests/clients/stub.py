"""A loopback HTTP stub for the ONE path a real server cannot produce on demand: a 429 with
a chosen Retry-After. It answers 429 ``fail_first`` times, then a valid /segment document."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEGMENT_DOC = {
    "image_id": "0" * 64,
    "image_size": {"width": 4, "height": 3},
    "cache_hit": False,
    "results": [{"prompt": "a cat", "detections": [
        {"score": 0.9, "box": [0.0, 0.0, 2.0, 2.0], "mask": {"format": "rle", "size": [3, 4], "counts": "02106"}}]}],
    "timings_ms": {"queue": 0.1, "image_encoder": 1.0, "text_encoder": 1.0, "decoder": 1.0, "postprocess": 0.1,
                   "total": 3.3},
    "model": {"name": "stub", "backend": "none", "precision": "fp32"},
}


class Stub:
    def __init__(self, fail_first: int, retry_after: str | None) -> None:
        self.fail_first = fail_first
        self.retry_after = retry_after
        self.requests = 0


@contextmanager
def rate_limiting_stub(fail_first: int, retry_after: str | None = "1") -> Iterator[tuple[str, Stub]]:
    state = Stub(fail_first, retry_after)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            state.requests += 1
            if state.requests <= state.fail_first:
                body = json.dumps({"error": {"code": "queue_full", "message": "inference queue is full"}}).encode()
                self.send_response(429)
                if state.retry_after is not None:
                    self.send_header("Retry-After", state.retry_after)
            else:
                body = json.dumps(SEGMENT_DOC).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
