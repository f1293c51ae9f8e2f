"""Every client request about an image carries X-Image-Id = the image's sha256, so a load balancer
can keep an image on the replica that caches its embedding; follow-ups that name the server's
(keyed) image_id carry the same key."""

from __future__ import annotations

import hashlib
import json

import httpx

from clients.client import IMAGE_ID_HEADER, Sam3Client


def test_requests_about_an_image_carry_its_id():
    seen: list[tuple[str, str | None]] = []
    image = b"\x89PNG\r\n\x1a\n" + b"0" * 64
    digest = hashlib.sha256(image).hexdigest()
    server_id = "ab" * 32  # the server's keyed id: not computable by the client

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get(IMAGE_ID_HEADER)))
        if request.url.path == "/embed":
            body = {"image_id": server_id, "image_size": {"width": 1, "height": 1}, "cached": False}
        elif request.method == "DELETE":
            body = {"image_id": server_id, "deleted": True}
        else:
            body = {"image_id": server_id, "image_size": {"width": 1, "height": 1}, "cache_hit": False,
                    "results": [], "timings_ms": {}, "model": {"name": "m", "backend": "b", "precision": "p"}}
        return httpx.Response(200, content=json.dumps(body), headers={"content-type": "application/json"})

    client = Sam3Client("http://127.0.0.1:1", transport=httpx.MockTransport(handler))
    client.segment(image, ["a cat"])
    client.segment_cached(server_id, ["a dog"])
    client.embed(image)
    client.delete_embedding(server_id)
    assert seen == [("/segment", digest), ("/segment", digest), ("/embed", digest), (f"/embeddings/{server_id}", digest)]
