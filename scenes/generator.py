"""Seeded synthetic scenes: coloured shapes on low-saturation backgrounds, with exact ground truth.

The single source of the demo model's data: training, the held-out evaluation set, the LoRA
fine-tune and the demo page's sample button all call :func:`generate_scene`. A scene is a
pure function of its seed and options, so any scene can be regenerated from its number.

Objects are filled circles, squares, triangles (and the held-out ``star``) in six saturated
colours, drawn in order so later objects may cover earlier ones. Ground truth is each object's
*visible* part; an object that would end up less than 60 % visible is placed elsewhere.
The image the model sees is the JPEG-compressed rendering (``Scene.jpeg``).

numpy + OpenCV only: the server imports this module for its sample-scene button.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import cv2
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
BASE_SHAPES = ("circle", "square", "triangle")
HELD_OUT_SHAPES = ("star",)  # never in base training: the LoRA fine-tune teaches it
ALL_SHAPES = BASE_SHAPES + HELD_OUT_SHAPES

COLOUR_JITTER = 12  # +- per RGB channel
MIN_VISIBLE = 0.6  # share of an object's area that must stay visible
SIZE_RANGE = (0.12, 0.35)  # object extent as a share of the image's short side
SIDE_RANGE = (240, 512)
MAX_PLACEMENT_TRIES = 40


@dataclass(frozen=True)
class SceneOptions:
    shapes: tuple[str, ...] = BASE_SHAPES
    side_range: tuple[int, int] = SIDE_RANGE
    objects: tuple[int, int] = (1, 6)
    jpeg_quality: tuple[int, int] = (70, 95)
    require_shape: str | None = None  # at least one object of this shape (LoRA scenes)


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    mask: np.ndarray = field(repr=False)  # bool [H, W], the visible part
    box: tuple[float, float, float, float]  # pixel xyxy of the visible part (x1, y1 exclusive)

    @property
    def category(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass(frozen=True)
class Scene:
    seed: int
    jpeg: bytes = field(repr=False)  # what a client uploads
    image: np.ndarray = field(repr=False)  # uint8 [H, W, 3] RGB, decoded from ``jpeg``
    objects: tuple[SceneObject, ...]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.image.shape[0], self.image.shape[1]

    def matching(self, prompt: str) -> list[int]:
        """Indices of the objects a prompt refers to (empty for absent or unknown prompts)."""
        return [i for i, obj in enumerate(self.objects) if prompt_matches(prompt, obj.colour, obj.shape)]


def prompt_matches(prompt: str, colour: str, shape: str) -> bool:
    """``"<colour> <shape>"`` names one kind of object, ``"<shape>"`` every colour of it."""
    words = prompt.split()
    if len(words) == 1:
        return words[0] == shape
    return len(words) == 2 and words[0] == colour and words[1] == shape


def vocabulary(shapes: Sequence[str] = BASE_SHAPES) -> list[str]:
    """Every prompt the model is trained on: colour-shape pairs, then the shapes alone."""
    return [f"{c} {s}" for s in shapes for c in COLOURS] + list(shapes)


def generate_scene(seed: int, options: SceneOptions = SceneOptions()) -> Scene:
    rng = np.random.default_rng(seed)
    lo, hi = options.side_range
    height, width = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    canvas = background(rng, height, width)
    count = int(rng.integers(options.objects[0], options.objects[1] + 1))
    shapes_to_draw = [str(rng.choice(options.shapes)) for _ in range(count)]
    if options.require_shape is not None and options.require_shape not in shapes_to_draw:
        shapes_to_draw[int(rng.integers(count))] = options.require_shape

    full_masks: list[np.ndarray] = []
    kinds: list[tuple[str, str]] = []
    fills: list[np.ndarray] = []
    for shape in shapes_to_draw:
        colour = str(rng.choice(list(COLOURS)))
        for _ in range(MAX_PLACEMENT_TRIES):
            mask = draw_shape(shape, sample_pose(rng, shape, height, width), height, width)
            if all_visible_enough(full_masks, mask):
                full_masks.append(mask)
                kinds.append((colour, shape))
                jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
                fills.append(np.clip(np.asarray(COLOURS[colour]) + jitter, 0, 255).astype(np.float32))
                break
    for mask, fill in zip(full_masks, fills):
        canvas[mask] = fill
    # A slight blur stands in for anti-aliased edges; then JPEG, as cameras deliver images.
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigmaX=0.6)
    quality = int(rng.integers(options.jpeg_quality[0], options.jpeg_quality[1] + 1))
    rgb = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    jpeg = buf.tobytes()
    image = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)

    objects = tuple(SceneObject(colour=colour, shape=shape, mask=visible, box=mask_box(visible))
                    for (colour, shape), visible in zip(kinds, visible_parts(full_masks)))
    return Scene(seed=seed, jpeg=jpeg, image=image, objects=objects)


def visible_parts(masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each mask less what the masks drawn after it cover (the list is in drawing order)."""
    parts = []
    for i, mask in enumerate(masks):
        visible = mask.copy()
        for later in masks[i + 1:]:
            visible &= ~later
        parts.append(visible)
    return parts


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def all_visible_enough(existing: list[np.ndarray], new: np.ndarray) -> bool:
    """Would every object (the new one on top) keep >= MIN_VISIBLE of its area?"""
    if new.sum() == 0:
        return False
    covered = new.copy()
    for mask in reversed(existing):  # from the top down: each is covered by what lies above it
        area = mask.sum()
        if (mask & ~covered).sum() < MIN_VISIBLE * area:
            return False
        covered |= mask
    return True


@dataclass(frozen=True)
class ShapePose:
    """Where and how a shape is drawn: centre, radius (half its extent), rotation, and a star's
    inner-to-outer radius ratio. Moving scenes (scenes/video.py) draw one object at many poses."""

    cx: float
    cy: float
    radius: float
    angle: float
    inner: float = 0.45


def sample_pose(rng: np.random.Generator, shape: str, height: int, width: int) -> ShapePose:
    short = min(height, width)
    extent = float(rng.uniform(*SIZE_RANGE)) * short  # diameter / side / circumscribed width
    radius = extent / 2.0
    cx = float(rng.uniform(radius, width - radius))
    cy = float(rng.uniform(radius, height - radius))
    angle = float(rng.uniform(0, 2 * math.pi))
    if shape == "star":
        return ShapePose(cx, cy, radius, angle, float(rng.uniform(0.38, 0.5)))
    return ShapePose(cx, cy, radius, angle)


def draw_shape(shape: str, pose: ShapePose, height: int, width: int) -> np.ndarray:
    """bool [H, W]: the shape at ``pose``, clipped to the image."""
    cx, cy, radius, angle = pose.cx, pose.cy, pose.radius, pose.angle
    mask = np.zeros((height, width), dtype=np.uint8)
    shift = 4  # sub-pixel vertex precision for OpenCV
    if shape == "circle":
        cv2.circle(mask, (round(cx * 16), round(cy * 16)), round(radius * 16), 1, thickness=-1,
                   lineType=cv2.LINE_8, shift=shift)
        return mask.astype(bool)
    if shape == "square":
        vertices = [(radius, angle + math.pi / 4 + k * math.pi / 2) for k in range(4)]
        # radius is half the side here: the square's circumscribed radius is side / sqrt(2)
        vertices = [(r * math.sqrt(2), a) for r, a in vertices]
    elif shape == "triangle":
        vertices = [(radius * 1.1, angle + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        vertices = [((radius * 1.05) if k % 2 == 0 else radius * 1.05 * pose.inner, angle + k * math.pi / 5)
                    for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    points = np.array([[cx + r * math.cos(a), cy + r * math.sin(a)] for r, a in vertices])
    points = np.round(points * (1 << shift)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=shift)
    return mask.astype(bool)


def background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """float32 [H, W, 3] in 0..255 with low saturation: flat, gradient, noise or blurred texture."""
    kind = int(rng.integers(4))
    level = float(rng.uniform(35, 215))
    if kind == 0:
        grey = np.full((height, width), level, dtype=np.float32)
    elif kind == 1:
        theta = float(rng.uniform(0, 2 * math.pi))
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        ramp = (xs * math.cos(theta) + ys * math.sin(theta))
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
        other = float(rng.uniform(35, 215))
        grey = level + (other - level) * ramp
    elif kind == 2:
        grey = level + rng.normal(0, rng.uniform(4, 18), size=(height, width)).astype(np.float32)
    else:
        noise = rng.normal(0, 1, size=(height, width)).astype(np.float32)
        noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=float(rng.uniform(2, 8)))
        noise /= max(float(noise.std()), 1e-6)
        grey = level + noise * float(rng.uniform(10, 30))
    tint = rng.uniform(-8, 8, size=3).astype(np.float32)  # keeps saturation low
    return np.clip(grey[..., None] + tint, 0, 255).astype(np.float32)
