"""Private image ids, one namespace per API key, /metrics behind the key, CORS and trusted hosts."""

from __future__ import annotations

import base64
import hashlib
import hmac

import httpx
import pytest

from tests.server.conftest import ServerProcess, image_bytes

ALICE = {"X-API-Key": "alice-key-1"}
BOB = {"X-API-Key": "bob-key-2"}
KEYS = {"SAM3_API_KEYS": "alice:alice-key-1,bob:bob-key-2", "SAM3_METRICS_NEED_KEY": "true"}


def _segment(c: httpx.Client, data: bytes, headers: dict[str, str]) -> httpx.Response:
    return c.post("/segment", files={"image": ("a.jpg", data, "image/jpeg")}, data={"prompt": "cat"}, headers=headers)


@pytest.fixture(scope="module")
def keyed(server_bundle, tmp_path_factory):
    proc = ServerProcess(server_bundle, KEYS, tmp_path_factory.mktemp("keyed"))
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def test_ids_are_keyed_and_differ_per_key(keyed) -> None:
    data = image_bytes(seed=31)
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        a = _segment(c, data, ALICE).json()
        b = _segment(c, data, BOB).json()
    assert a["image_id"] != hashlib.sha256(data).hexdigest()  # holding the file tells nothing
    assert a["image_id"] != b["image_id"]
    assert b["cache_hit"] is False  # Alice's upload is no warm cache for Bob: nothing to probe


def test_one_key_cannot_read_probe_or_delete_anothers_embeddings(keyed) -> None:
    data = image_bytes(seed=32)
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        alice_id = c.post("/embed", files={"image": ("a.jpg", data, "image/jpeg")}, headers=ALICE).json()["image_id"]
        # Read: Alice's id means nothing in Bob's namespace.
        r = c.post("/segment", json={"image_id": alice_id, "prompts": ["cat"]}, headers=BOB)
        assert r.status_code == 404 and r.json()["error"]["code"] == "image_not_cached"
        # Delete: neither.
        assert c.delete(f"/embeddings/{alice_id}", headers=BOB).status_code == 404
        # Probe: Bob embedding the same bytes is a cold miss for him (cached: false), then his own.
        assert c.post("/embed", json={"image": base64.b64encode(data).decode()}, headers=BOB).json()["cached"] is False
        assert c.post("/embed", json={"image": base64.b64encode(data).decode()}, headers=BOB).json()["cached"] is True
        # Alice's entry survived all of it.
        r = c.post("/segment", json={"image_id": alice_id, "prompts": ["cat"]}, headers=ALICE)
        assert r.status_code == 200 and r.json()["cache_hit"] is True
        assert c.delete(f"/embeddings/{alice_id}", headers=ALICE).status_code == 200
        # Unknown keys open nothing.
        for headers in ({}, {"X-API-Key": "alice-key-1x"}, {"X-API-Key": "ALICE-KEY-1"}):
            assert _segment(c, data, headers).status_code == 401


def test_metrics_behind_the_key(keyed) -> None:
    assert httpx.get(f"{keyed.url}/metrics").status_code == 401
    assert httpx.get(f"{keyed.url}/metrics", headers={"X-API-Key": "nope"}).status_code == 401
    ok = httpx.get(f"{keyed.url}/metrics", headers=BOB)
    assert ok.status_code == 200 and "sam3_requests_in_progress" in ok.text
    assert httpx.get(f"{keyed.url}/healthz").status_code == 200 and httpx.get(f"{keyed.url}/readyz").status_code == 200


def test_the_secret_is_persisted_or_configured(server_bundle, tmp_path) -> None:
    data = image_bytes(seed=33)
    secret_file = tmp_path / "state" / "id-secret"

    def image_id(env: dict[str, str]) -> str:
        proc = ServerProcess(server_bundle, env, tmp_path)
        try:
            proc.wait_ready()
            with httpx.Client(base_url=proc.url, timeout=30) as c:
                return str(_segment(c, data, {}).json()["image_id"])
        finally:
            proc.stop()

    first = image_id({"SAM3_ID_SECRET_FILE": str(secret_file)})
    assert secret_file.stat().st_mode & 0o777 == 0o600 and len(secret_file.read_bytes()) == 32
    assert image_id({"SAM3_ID_SECRET_FILE": str(secret_file)}) == first  # stable across restarts
    # Configured: the same id on every replica that shares the secret, and it is the documented HMAC.
    configured = image_id({"SAM3_ID_SECRET": "shared by the replicas"})
    key = hashlib.sha256(b"shared by the replicas").digest()
    assert configured == hmac.new(key, b"\x00" + data, hashlib.sha256).hexdigest() != first


def test_cors_same_origin_by_default_and_configurable(server, server_bundle, tmp_path) -> None:
    preflight = {"Origin": "http://elsewhere.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key,content-type"}
    refused = httpx.options(f"{server.url}/segment", headers=preflight)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "cors_rejected"
    simple = httpx.get(f"{server.url}/healthz", headers={"Origin": "http://elsewhere.example"})
    assert "access-control-allow-origin" not in simple.headers
    proc = ServerProcess(server_bundle, {"SAM3_CORS_ORIGINS": "http://elsewhere.example"}, tmp_path)
    try:
        proc.wait_ready()
        allowed = httpx.options(f"{proc.url}/segment", headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "http://elsewhere.example"
        assert "x-api-key" in allowed.headers["access-control-allow-headers"].lower()
        other = httpx.options(f"{proc.url}/segment", headers={**preflight, "Origin": "http://evil.example"})
        assert other.status_code == 400
    finally:
        proc.stop()


def test_trusted_hosts(server_bundle, tmp_path) -> None:
    proc = ServerProcess(server_bundle, {"SAM3_TRUSTED_HOSTS": "sam3.local,*.example.com"}, tmp_path)
    try:
        proc.wait_ready()
        with httpx.Client(base_url=proc.url, timeout=30) as c:
            bad = c.get("/info", headers={"Host": "attacker.test"})
            assert bad.status_code == 400 and bad.json()["error"]["code"] == "untrusted_host"
            assert c.post("/segment", json={}, headers={"Host": "example.com.attacker.test"}).status_code == 400
            assert c.get("/info", headers={"Host": "sam3.local:8000"}).status_code == 200
            assert c.get("/info", headers={"Host": "api.example.com"}).status_code == 200
            assert c.get("/readyz", headers={"Host": "attacker.test"}).status_code == 200  # healthchecks
    finally:
        proc.stop()
