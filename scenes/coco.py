"""Generated scenes written as a COCO instance-segmentation dataset, the format the accuracy
command (and SAM3-LoRA's training) reads.

One category per colour-shape pair (``"red circle"``), with the shape as supercategory, so
the accuracy command can prompt with category names and with supercategory names
(``"circle"`` = every circle). Images are the exact JPEG bytes a client would upload.
Held-out seeds are small integers; training scenes use seeds from 1e9 up, so they never meet.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from scenes.generator import BASE_SHAPES, COLOURS, Scene, SceneOptions, generate_scene
from scenes.shifted import render_shifted_scene

# Renderers of held-out sets: the training generator's own, and a second family drawn by other
# code under other conditions (scenes/shifted.py), so accuracy is not one renderer's quirks.
FAMILIES: dict[str, Callable[[int, SceneOptions], Scene]] = {
    "generator": generate_scene,
    "shifted": render_shifted_scene,
}

ANNOTATIONS = "annotations.json"
IMAGES = "images"


def categories(shapes: Sequence[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": f"{colour} {shape}", "supercategory": shape}
            for i, (shape, colour) in enumerate((s, c) for s in shapes for c in COLOURS)]


def write_scene_dataset(out: str | Path, count: int, *, seed: int = 0, shapes: Sequence[str] = BASE_SHAPES,
                        require_shape: str | None = None, family: str = "generator") -> Path:
    """Write ``count`` scenes (seeds ``seed * 100_000 + i``) of ``family`` as a COCO dataset, atomically."""
    if count < 1:
        raise ValueError("count must be >= 1")
    if family not in FAMILIES:
        raise ValueError(f"unknown scene family {family!r} (known: {', '.join(FAMILIES)})")
    render = FAMILIES[family]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (staging / IMAGES).mkdir()
        cats = categories(shapes)
        cat_ids = {c["name"]: c["id"] for c in cats}
        images, annotations = [], []
        options = SceneOptions(shapes=tuple(shapes), require_shape=require_shape)
        for i in range(count):
            scene_seed = seed * 100_000 + i
            scene = render(scene_seed, options)
            name = f"scene_{scene_seed:08d}.jpg"
            (staging / IMAGES / name).write_bytes(scene.jpeg)
            height, width = scene.size
            image_id = i + 1
            images.append({"id": image_id, "file_name": f"{IMAGES}/{name}", "height": height, "width": width,
                           "scene_seed": scene_seed})
            for obj in scene.objects:
                rle = mask_utils.encode(np.asfortranarray(obj.mask.astype(np.uint8)))
                x0, y0, x1, y1 = obj.box
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_ids[obj.category],
                    "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    "area": float(obj.area), "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0,
                })
        doc = {
            "info": {"description": f"generated shape scenes ({family} family)", "seed": seed, "count": count,
                     "shapes": list(shapes), "require_shape": require_shape, "family": family},
            "images": images, "annotations": annotations, "categories": cats,
        }
        (staging / ANNOTATIONS).write_text(json.dumps(doc))
        os.chmod(staging, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
