"""Server fixtures: a REAL uvicorn process (``python -m server``) on 127.0.0.1 with the tiny bundle.

Tests talk to it over loopback with httpx, exactly as a client would; nothing is mocked.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Mapping

import httpx
import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """``python -m server`` in a subprocess; ``stop()`` sends SIGTERM like ``docker stop``."""

    def __init__(self, bundle: Path, env: Mapping[str, str] | None = None, log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAM3_")}
        self.log_path = (log_dir or Path("/tmp")) / f"server-{self.port}.log"
        # The id secret the server would persist under ~/.local/state: next to the log instead.
        full_env.update({"SAM3_LOG_LEVEL": "warning", "PYTHONUNBUFFERED": "1",
                         "SAM3_ID_SECRET_FILE": str(self.log_path.with_suffix(".id-secret")), **(env or {})})
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server", "--bundle", str(bundle), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                last = httpx.get(f"{self.url}/readyz", timeout=2.0)
                if last.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout_s} s (last {last and last.text}):\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        return int(self.proc.returncode)


@pytest.fixture(scope="session")
def server_bundle(request: pytest.FixtureRequest) -> Path:
    """The session's tiny bundle; SAM3_TEST_BUNDLE=DIR reuses one already built (faster iteration)."""
    prebuilt = os.environ.get("SAM3_TEST_BUNDLE")
    if prebuilt:
        return Path(prebuilt)
    return request.getfixturevalue("tiny_bundle")


# Small limits so "too large" cases are cheap to send.
SERVER_ENV = {
    "SAM3_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
    "SAM3_MAX_MEGAPIXELS": "4",
    "SAM3_MAX_PROMPTS": "8",
    "SAM3_MAX_PROMPT_CHARS": "64",
    "SAM3_QUEUE_SIZE": "16",
    "SAM3_REQUEST_TIMEOUT_S": "30",
}


@pytest.fixture(scope="session")
def server(server_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(server_bundle, SERVER_ENV, tmp_path_factory.mktemp("server-logs"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture()
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as c:
        yield c


def image_bytes(width: int = 160, height: int = 120, fmt: str = "JPEG", seed: int = 0, mode: str = "RGB", **save) -> bytes:
    """A deterministic noise image; different seeds give different bytes (a cold cache)."""
    rng = np.random.default_rng(seed)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()
