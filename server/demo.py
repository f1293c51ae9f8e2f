"""Sample scenes for the demo page: ``GET /demo/scene?seed=N`` draws one generated scene.

The trained demo model knows coloured shapes (scenes/generator.py); the page's "sample scene"
button asks for one so a visitor can try prompts whose right answers are known. The answer is
the JPEG (base64, as the page posts it to /segment) and what the scene holds. Bounded cost:
scenes are at most 512 px a side (~15 ms to draw), the seed is range-checked.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from scenes.generator import SceneOptions, generate_scene

router = APIRouter()
MAX_SEED = 2**31 - 1


@router.get("/demo/scene", summary="A generated sample scene (JPEG, base64) and its objects")
async def demo_scene(seed: int = Query(0, ge=0, le=MAX_SEED)) -> dict[str, Any]:
    scene = await run_in_threadpool(generate_scene, seed, SceneOptions())
    height, width = scene.size
    return {
        "seed": seed,
        "width": width,
        "height": height,
        "image": base64.b64encode(scene.jpeg).decode("ascii"),
        "objects": [{"category": obj.category, "box": list(obj.box)} for obj in scene.objects],
    }
