"""A second scene renderer: the same vocabulary, drawn by other code under other conditions.

A model measured only on ``scenes.generator``'s images could be learning that renderer's
quirks (OpenCV's polygon rasteriser, its blur, its four background kinds, its size range). This
family shares nothing with it but the vocabulary and the scene/ground-truth types: shapes are
rasterised by Pillow at 4x and box-filtered (anti-aliased edges instead of a blur), images are
200-640 px a side, backgrounds are kinds the generator never makes (stripes, checkerboards,
vignettes, two-tone splits, speckled paper), colours jitter more (+-18), objects span 10-38 % of
the short side, and JPEG comes from Pillow at quality 60-95. It is never used for training.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw

from scenes.generator import (BASE_SHAPES, COLOURS, MAX_PLACEMENT_TRIES, Scene, SceneObject, SceneOptions,
                              all_visible_enough, mask_box, visible_parts)

SIDE_RANGE = (200, 640)
SIZE_RANGE = (0.10, 0.38)
COLOUR_JITTER = 18
JPEG_QUALITY = (60, 95)
SUPERSAMPLE = 4
BACKGROUND_KINDS = ("stripes", "checker", "vignette", "split", "paper")


def render_shifted_scene(seed: int, options: SceneOptions = SceneOptions(shapes=BASE_SHAPES)) -> Scene:
    """A scene of this family; ``options`` give the shapes, object count and required shape
    (its side and JPEG ranges are this family's own)."""
    rng = np.random.default_rng([seed, 0x5EED])
    height, width = (int(rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1)) for _ in range(2))
    canvas = _background(rng, height, width)
    count = int(rng.integers(options.objects[0], options.objects[1] + 1))
    shapes = [str(rng.choice(options.shapes)) for _ in range(count)]
    if options.require_shape is not None and options.require_shape not in shapes:
        shapes[int(rng.integers(count))] = options.require_shape

    placed: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # colour, shape, coverage, mask
    for shape in shapes:
        colour = str(rng.choice(list(COLOURS)))
        for _ in range(MAX_PLACEMENT_TRIES):
            coverage = _coverage(rng, shape, height, width)
            mask = coverage >= 0.5
            if all_visible_enough([p[3] for p in placed], mask):
                placed.append((colour, shape, coverage, mask))
                break
    for colour, _, coverage, _ in placed:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
        fill = np.clip(np.asarray(COLOURS[colour], dtype=np.float32) + jitter, 0, 255)
        alpha = coverage[..., None]
        canvas = canvas * (1 - alpha) + fill * alpha

    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    jpeg = buffer.getvalue()
    image = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))

    visible = visible_parts([mask for _, _, _, mask in placed])
    objects = tuple(SceneObject(colour=colour, shape=shape, mask=part, box=mask_box(part))
                    for (colour, shape, _, _), part in zip(placed, visible))
    return Scene(seed=seed, jpeg=jpeg, image=image, objects=objects)


def _coverage(rng: np.random.Generator, shape: str, height: int, width: int) -> np.ndarray:
    """float32 [H, W] share of each pixel the shape covers (Pillow at 4x, box-filtered)."""
    short = min(height, width)
    radius = float(rng.uniform(*SIZE_RANGE)) * short / 2
    cx, cy = float(rng.uniform(radius, width - radius)), float(rng.uniform(radius, height - radius))
    angle = float(rng.uniform(0, 2 * math.pi))
    big = Image.new("L", (width * SUPERSAMPLE, height * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    s = SUPERSAMPLE
    if shape == "circle":
        draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=255)
    else:
        if shape == "square":
            vertices = [(radius * math.sqrt(2), angle + math.pi / 4 + k * math.pi / 2) for k in range(4)]
        elif shape == "triangle":
            vertices = [(radius * 1.1, angle + k * 2 * math.pi / 3) for k in range(3)]
        elif shape == "star":
            inner = float(rng.uniform(0.38, 0.5))
            vertices = [(radius * 1.05 * (1 if k % 2 == 0 else inner), angle + k * math.pi / 5) for k in range(10)]
        else:
            raise ValueError(f"unknown shape {shape!r}")
        draw.polygon([((cx + r * math.cos(a)) * s, (cy + r * math.sin(a)) * s) for r, a in vertices], fill=255)
    big_array = np.asarray(big, dtype=np.float32) / 255.0
    return big_array.reshape(height, s, width, s).mean(axis=(1, 3))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3], low saturation, of a kind ``scenes.generator`` never draws."""
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    level = float(rng.uniform(40, 210))
    contrast = float(rng.uniform(6, 28))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "stripes":
        theta, period = float(rng.uniform(0, math.pi)), float(rng.uniform(6, 40))
        phase = (xs * math.cos(theta) + ys * math.sin(theta)) / period
        grey = level + contrast * np.sign(np.sin(2 * math.pi * phase))
    elif kind == "checker":
        cell = float(rng.uniform(8, 48))
        grey = level + contrast * (((xs // cell) + (ys // cell)) % 2 * 2 - 1)
    elif kind == "vignette":
        r = np.hypot(xs - width / 2, ys - height / 2) / math.hypot(width / 2, height / 2)
        grey = level + 3 * contrast * (0.5 - r)
    elif kind == "split":
        theta = float(rng.uniform(0, 2 * math.pi))
        side = (xs - width * rng.uniform(0.3, 0.7)) * math.cos(theta) + (ys - height * rng.uniform(0.3, 0.7)) * math.sin(theta)
        grey = np.where(side > 0, level, float(rng.uniform(40, 210)))
    else:  # paper: fine speckle plus sparse darker fibres
        grey = level + rng.normal(0, contrast / 3, size=(height, width))
        grey -= (rng.random((height, width)) < 0.01) * contrast
    tint = rng.uniform(-10, 10, size=3).astype(np.float32)
    return np.clip(grey.astype(np.float32)[..., None] + tint, 0, 255)
