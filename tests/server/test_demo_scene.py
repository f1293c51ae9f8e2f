"""GET /demo/scene: a generated sample scene for the demo page, seeded and bounded."""

from __future__ import annotations

import base64

import cv2
import numpy as np
from fastapi import FastAPI
from fastapi.testclient import TestClient

from scenes.generator import generate_scene
from server.demo import router


def _client() -> TestClient:
    app = FastAPI()
    app.include_router(router)
    return TestClient(app)


def test_scene_is_the_generators_scene_for_that_seed() -> None:
    body = _client().get("/demo/scene", params={"seed": 42}).json()
    scene = generate_scene(42)
    jpeg = base64.b64decode(body["image"])
    assert jpeg == scene.jpeg
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (body["height"], body["width"]) == scene.size
    assert [o["category"] for o in body["objects"]] == [o.category for o in scene.objects]


def test_bad_seeds_are_422() -> None:
    client = _client()
    for seed in ("-1", str(2**31), "abc"):
        assert client.get("/demo/scene", params={"seed": seed}).status_code == 422
