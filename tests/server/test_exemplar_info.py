"""/info says what the served bundle can do: text prompts, and exemplar boxes up to max_boxes."""

from __future__ import annotations

import httpx


def test_info_shows_the_bundles_capabilities(client: httpx.Client) -> None:
    manifest = client.get("/info").json()["manifest"]
    assert manifest["capabilities"] == {"text_prompts": True, "exemplar_boxes": True, "max_boxes": 16}
    assert {"geometry_encoder", "exemplar_decoder"} <= set(manifest["parts"])
