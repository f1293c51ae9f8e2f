"""The response models are what the routes really send: FastAPI validates every body against them,
so a body that drifts from the documented shape is a 500 here, never a surprise for a client."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from engines.types import STAGES, ImageSize
from server.app import create_app
from server.schemas import RESPONSE_STAGES, SegmentResponse, Timings
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
