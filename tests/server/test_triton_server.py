"""``python -m server --backend triton``: our API and cache in front, the parts on a real Triton.

One story, in order, against one server process and a tritonserver it outlives:
1. the server starts before Triton: /readyz is 503 while Triton is unreachable;
2. Triton starts: the server becomes ready and answers /segment with the local server's documents
   (cold upload, then a follow-up by image_id from OUR cache);
3. Triton is killed (SIGKILL) mid-run: /segment is a clear 503 ``backend_unavailable`` within the
   call timeout, not a hang, and /readyz turns 503;
4. Triton comes back on the same port: the server serves again without a restart.
"""

from __future__ import annotations

import time

import httpx
import pytest

from deploy.triton.local import LocalTriton, free_port
from tests.server.conftest import SERVER_ENV, ServerProcess, image_bytes
from tests.triton_support import require_tritonserver, triton_repository  # noqa: F401

CALL_TIMEOUT_S = 5.0
PROMPTS = ["a cat", "a red car"]
FORM = {"prompt": PROMPTS, "score_threshold": "0", "max_detections": "5"}


def segment(url: str, image: bytes) -> httpx.Response:
    return httpx.post(f"{url}/segment", files={"image": ("i.jpg", image, "image/jpeg")}, data=FORM, timeout=60)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def ready(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


def comparable(doc: dict) -> dict:
    return {k: doc[k] for k in ("image_id", "image_size", "results")}


def test_server_on_triton_serves_like_local_and_fails_fast(server, server_bundle, triton_repository, tmp_path):
    require_tritonserver()
    grpc_port = free_port()
    env = {**SERVER_ENV, "SAM3_BACKEND": "triton", "SAM3_TRITON_URL": f"127.0.0.1:{grpc_port}",
           "SAM3_TRITON_TIMEOUT_S": str(CALL_TIMEOUT_S), "SAM3_TRITON_WAIT_S": "300",
           # One id secret for both servers, as replicas share one: the same image, the same id.
           "SAM3_ID_SECRET_FILE": str(server.log_path.with_suffix(".id-secret"))}
    proc = ServerProcess(server_bundle, env, tmp_path)
    triton = LocalTriton(triton_repository, grpc_port=grpc_port, log_path=tmp_path / "tritonserver.log")
    try:
        # 1. No Triton yet: the process is up, not ready, and says it is still loading.
        wait_for(lambda: _answers(proc.url), 60, "the server process")
        for _ in range(3):
            response = ready(proc.url)
            assert response.status_code == 503 and response.json()["state"] in ("starting", "loading"), response.text
            time.sleep(0.5)
        assert proc.proc.poll() is None

        # 2. Triton up: ready, and the same documents as the local (onnxruntime) server.
        triton.start()
        wait_for(lambda: ready(proc.url).status_code == 200, 120, "/readyz 200 once Triton is up")
        image = image_bytes(seed=11)
        remote, local = segment(proc.url, image), segment(server.url, image)
        assert remote.status_code == 200 and local.status_code == 200, remote.text
        assert comparable(remote.json()) == comparable(local.json())
        assert sum(len(r["detections"]) for r in remote.json()["results"]) > 0
        assert remote.json()["model"]["backend"] == "triton"
        follow = httpx.post(f"{proc.url}/segment", json={"image_id": remote.json()["image_id"], "prompts": ["person"],
                                                         "score_threshold": 0, "max_detections": 5}, timeout=60)
        assert follow.status_code == 200 and follow.json()["cache_hit"] is True

        # 3. Triton dies mid-run: a clear 503 within the call timeout, and /readyz follows.
        triton.kill()
        started = time.monotonic()
        dead = segment(proc.url, image_bytes(seed=12))
        elapsed = time.monotonic() - started
        assert dead.status_code == 503, dead.text
        assert dead.json()["error"]["code"] == "backend_unavailable"
        assert "Triton" in dead.json()["error"]["message"]
        assert elapsed < CALL_TIMEOUT_S + 5, f"503 took {elapsed:.1f} s"
        probe = ready(proc.url)
        assert probe.status_code == 503 and probe.json()["error"]["code"] == "backend_unavailable"

        # 4. Triton back on the same port: served again, no server restart.
        triton = LocalTriton(triton_repository, grpc_port=grpc_port, log_path=tmp_path / "tritonserver-2.log")
        triton.start()
        wait_for(lambda: ready(proc.url).status_code == 200, 60, "/readyz 200 after Triton returned")
        again = segment(proc.url, image)
        assert again.status_code == 200 and comparable(again.json()) == comparable(local.json())
    finally:
        triton.stop()
        proc.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("argv, message", [
    (["--backend", "triton"], "triton_url"),
])
def test_triton_without_url_is_refused_in_one_line(argv, message, server_bundle):
    import subprocess
    import sys

    from tests.server.conftest import REPO

    result = subprocess.run([sys.executable, "-m", "server", "--bundle", str(server_bundle), *argv],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr
