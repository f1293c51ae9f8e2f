"""Masks, boxes and "prompt score" labels drawn over the image (Pillow only: a client machine
needs no OpenCV). One colour per prompt so several prompts stay readable."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from clients.results import PromptResult

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))  # fmt: skip


def load_rgb(path_or_bytes: str | bytes) -> Image.Image:
    """The image as the server saw it: EXIF orientation applied (boxes are in those pixels)."""
    import io

    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def draw_overlay(image: Image.Image, results: Sequence[PromptResult], alpha: float = 0.45) -> Image.Image:
    """RGB image + results -> new RGB image. Masks of the wrong size (not this image) are skipped."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for index, result in enumerate(results):
        colour = np.asarray(PALETTE[index % len(PALETTE)], dtype=np.float32)
        # Tint the union once: overlapping detections must not compound into an opaque colour.
        union = np.zeros(canvas.shape[:2], dtype=bool)
        for det in result.detections:
            if det.mask is not None and det.mask.size == canvas.shape[:2]:
                union |= det.mask.array
        canvas[union] = canvas[union] * (1 - alpha) + colour * alpha
    out = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 400))
    font = _font(max(10, round(max(out.size) / 60)))
    for index, result in enumerate(results):
        colour = PALETTE[index % len(PALETTE)]
        for det in result.detections:
            x0, y0, x1, y1 = det.box
            draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=width)
            label = f"{result.prompt} {det.score:.2f}"
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            ty = max(0.0, y0 - (bottom - top) - 2)
            draw.rectangle((x0, ty, x0 + right - left + 2, ty + bottom - top + 2), fill=colour)
            draw.text((x0 + 1 - left, ty + 1 - top), label, fill=(255, 255, 255), font=font)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()
