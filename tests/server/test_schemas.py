"""The response models are what the routes really send: FastAPI validates every body against them,
so a body that drifts from the documented shape is a 500 here, never a surprise for a client. The
request bodies /openapi.json documents are the parser's own models with the server's limits."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from engines.types import STAGES, ImageSize
from server.app import create_app
from server.schemas import (
    RESPONSE_STAGES,
    LimitsOut,
    RequestLimits,
    SegmentOptionsModel,
    SegmentResponse,
    Timings,
    request_models,
)
from server.service import ModelIdentity, Segmented
from server.settings import Settings


class _NoPipeline:
    """Enough for the worker to report ready; the service call itself is replaced below."""

    def close(self) -> None:
        pass


def _segmented(detection: dict[str, Any]) -> Segmented:
    return Segmented(
        image_id="0" * 64,
        image_size=ImageSize(4, 3),
        cache_hit=True,
        document={"image_size": {"width": 4, "height": 3}, "results": [{"prompt": "cat", "detections": [detection]}]},
        timings_ms={stage: 1.0 for stage in RESPONSE_STAGES},
        model=ModelIdentity("m", "onnxruntime", "fp32"),
    )


def _post(detection: dict[str, Any]):
    app = create_app(Settings(warmup=False), pipeline_factory=lambda on_state: _NoPipeline())

    async def segment(**_: Any) -> Segmented:
        return _segmented(detection)

    app.state.service.segment = segment
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.worker.ready_event.wait(5)
        return client.post("/segment", json={"image_id": "0" * 64, "prompts": ["cat"]})


def test_a_valid_body_is_sent() -> None:
    good = {"score": 0.9, "box": [0.0, 0.0, 2.0, 2.0], "mask": {"format": "rle", "size": [3, 4], "counts": "c"}}
    response = _post(good)
    assert response.status_code == 200, response.text
    body = SegmentResponse.model_validate(response.json())
    assert body.results[0].detections[0].mask is not None


def test_a_body_that_drifts_from_its_model_is_a_500() -> None:
    for bad in (
        {"score": 0.9, "box": [0.0, 0.0, 2.0]},  # three coordinates
        {"score": 0.9, "box": [0.0, 0.0, 2.0, 2.0], "mask": {"format": "rle", "size": [3, 4]}},  # no counts
        {"score": 0.9, "box": [0.0, 0.0, 2.0, 2.0], "extra": 1},  # an undocumented field
    ):
        response = _post(bad)
        assert response.status_code == 500 and response.json()["error"]["code"] == "internal_error", bad


def test_every_stage_a_response_reports_is_documented() -> None:
    assert RESPONSE_STAGES == ("queue", *STAGES, "total")
    assert all(Timings.model_fields[stage].description for stage in RESPONSE_STAGES)


def _limits(max_boxes: int | None) -> RequestLimits:
    return RequestLimits(max_upload_bytes=3000, max_megapixels=1.0, max_prompts=5, max_prompt_chars=12,
                         max_detections=7, max_masks=20, request_timeout_s=1.0,
                         allowed_content_types=["image/png"], max_boxes=max_boxes)


def test_request_bodies_are_the_models_schema_with_the_servers_limits() -> None:
    models = request_models(_limits(3))
    bodies, components = models.openapi()
    as_json = bodies["segment"]["application/json"]["schema"]
    form = bodies["segment"]["multipart/form-data"]["schema"]
    # Every option the parser validates is documented in both body forms.
    assert set(SegmentOptionsModel.model_fields) <= set(as_json["properties"]) & set(form["properties"])
    assert as_json["properties"]["prompts"]["maxItems"] == 5
    text, entry = as_json["properties"]["prompts"]["items"]["anyOf"]
    assert text["maxLength"] == 12 and form["properties"]["prompt"]["anyOf"][0]["maxLength"] == 12
    assert components[entry["$ref"].rsplit("/", 1)[1]]["properties"]["boxes"]["maxItems"] == 3
    assert form["properties"]["image"]["maxLength"] == 3000
    assert bodies["embed"]["application/json"]["schema"]["properties"]["image"]["maxLength"] == 4000
    assert as_json["properties"]["max_detections"]["anyOf"][0]["maximum"] == 7
    # /info reports the same limits, without the bundle's box limit (under capabilities there).
    assert set(models.limits.info()) == set(LimitsOut.model_fields) and models.limits.info()["max_prompts"] == 5


def test_a_text_only_bundle_documents_no_box_prompts_but_the_parser_takes_them() -> None:
    documented = request_models(_limits(0))
    bodies, _ = documented.openapi()
    assert "exemplar" not in bodies["segment"]["multipart/form-data"]["schema"]["properties"]
    assert "$ref" not in str(bodies["segment"]["application/json"]["schema"]["properties"]["prompts"])
    # Before the bundle is known the parser lets boxes through: the pipeline owns that answer.
    parsed = request_models(_limits(None)).segment_json.model_validate_json(
        '{"image_id": "' + "0" * 64 + '", "prompts": ["cat", {"boxes": [[1, 2, 3, 4]]}]}')
    assert parsed.prompts[0] == "cat" and parsed.prompts[1].boxes == [[1.0, 2.0, 3.0, 4.0]]
