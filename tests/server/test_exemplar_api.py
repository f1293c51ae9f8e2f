"""POST /segment with exemplar boxes: JSON and multipart, the same answer as the pipeline, clear 422s."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from engines.options import SegmentOptions
from engines.pipeline import Sam3Pipeline
from engines.types import ExemplarBox, Prompt
from tests.server.conftest import SERVER_ENV, ServerProcess, image_bytes

WIDTH, HEIGHT = 160, 120
BOX = [20.0, 30.0, 90.0, 100.0]


def _json(client: httpx.Client, prompts: list, **extra) -> httpx.Response:
    import base64

    body = {"image": base64.b64encode(image_bytes(WIDTH, HEIGHT, seed=51)).decode(), "prompts": prompts,
            "score_threshold": 0.0, "max_detections": 3, **extra}
    return client.post("/segment", json=body)


def _scores(document: dict) -> list[list[float]]:
    return [[round(d["score"], 4) for d in r["detections"]] for r in document["results"]]


def test_boxes_with_and_without_text_answer_as_the_pipeline_does(client: httpx.Client, server_bundle: Path) -> None:
    prompts = ["a cat", {"boxes": [BOX]}, {"text": "a dog", "boxes": [BOX, [100, 10, 150, 60]], "labels": [1, 0]}]
    response = _json(client, prompts)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["prompt"] for r in body["results"]] == ["a cat", "visual", "a dog"]
    assert body["timings_ms"]["geometry_encoder"] > 0
    with Sam3Pipeline.from_bundle(server_bundle, backend="onnxruntime") as pipe:
        expected = pipe.segment(
            image_bytes(WIDTH, HEIGHT, seed=51),
            [Prompt(text="a cat"), Prompt(boxes=(ExemplarBox(tuple(BOX)),)),
             Prompt(text="a dog", boxes=(ExemplarBox(tuple(BOX)), ExemplarBox((100, 10, 150, 60), False)))],
            SegmentOptions(score_threshold=0.0, max_detections=3))
    assert _scores(body) == [[round(d.score, 4) for d in r.detections] for r in expected.results]


def test_multipart_exemplar_fields_equal_json_and_a_cached_image_costs_no_encoder(client: httpx.Client) -> None:
    as_json = _json(client, [{"boxes": [BOX]}, "a cat"]).json()
    form = client.post("/segment", files={"image": ("x.jpg", image_bytes(WIDTH, HEIGHT, seed=51), "image/jpeg")},
                       data={"exemplar": json.dumps({"boxes": [BOX]}), "prompt": "a cat",
                             "score_threshold": "0", "max_detections": "3"})
    assert form.status_code == 200, form.text
    # Fields keep their order: the exemplar came first.
    assert [r["prompt"] for r in form.json()["results"]] == ["visual", "a cat"]
    assert _scores(form.json()) == _scores(as_json)
    again = client.post("/segment", json={"image_id": as_json["image_id"], "prompts": [{"boxes": [[5, 5, 60, 60]]}]})
    assert again.status_code == 200, again.text
    assert again.json()["cache_hit"] is True and again.json()["timings_ms"]["image_encoder"] == 0


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"boxes": [[50, 50, 50, 80]]}, "degenerate"),
        ({"boxes": [[10, 10, 200, 80]]}, "outside the 160x120 image"),
        ({"boxes": [[10, 10, 20, 20]] * 17}, "at most 16"),
        ({"boxes": [BOX], "labels": [0]}, "negative boxes need a text"),
        ({"boxes": [BOX, BOX], "labels": [1]}, "1 labels for 2 boxes"),
        ({"boxes": [BOX], "labels": [2]}, "labels are 1 (positive) or 0"),
        ({"boxes": [[1, 2, 3]]}, "a box is [x0, y0, x1, y1]"),
        ({"boxes": []}, "at least one box"),
    ],
)
def test_bad_boxes_are_422_invalid_box(client: httpx.Client, prompt: dict, message: str) -> None:
    response = _json(client, [prompt])
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_box" and message in error["message"], error


def test_bad_multipart_exemplar_is_422(client: httpx.Client) -> None:
    response = client.post("/segment", files={"image": ("x.jpg", image_bytes(WIDTH, HEIGHT), "image/jpeg")},
                           data={"exemplar": "[10, 10, 20"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_box", response.text


def test_openapi_documents_exemplar_entries(client: httpx.Client) -> None:
    document = client.get("/openapi.json").json()
    body = document["paths"]["/segment"]["post"]["requestBody"]["content"]
    ref = body["application/json"]["schema"]["properties"]["prompts"]["items"]["anyOf"][1]["$ref"]
    entry = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert entry["properties"]["boxes"]["maxItems"] == 16 and entry["required"] == ["boxes"]
    assert "exemplar" in body["multipart/form-data"]["schema"]["properties"]


def test_a_bundle_without_exemplar_graphs_refuses_boxes_and_does_not_document_them(
        server_bundle: Path, tmp_path: Path) -> None:
    from tests.conftest import text_only_copy

    text_only = text_only_copy(server_bundle, tmp_path / "text-only")
    (tmp_path / "logs").mkdir()
    proc = ServerProcess(text_only, SERVER_ENV, tmp_path / "logs").wait_ready()
    try:
        with httpx.Client(base_url=proc.url, timeout=30) as client:
            response = _json(client, [{"boxes": [BOX]}])
            assert response.status_code == 422, response.text
            assert response.json()["error"]["code"] == "exemplars_unsupported"
            assert _json(client, ["a cat"]).status_code == 200
            body = client.get("/openapi.json").json()["paths"]["/segment"]["post"]["requestBody"]["content"]
            assert "exemplar" not in body["multipart/form-data"]["schema"]["properties"]
            assert body["application/json"]["schema"]["properties"]["prompts"]["items"]["type"] == "string"
    finally:
        proc.stop()
