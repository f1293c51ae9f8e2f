"""The scene generator: seeded, within its stated ranges, ground truth consistent with the image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

from scenes.coco import write_scene_dataset
from scenes.generator import (
    all_visible_enough,
    ALL_SHAPES, BASE_SHAPES, COLOURS, SceneOptions, generate_scene, prompt_matches, vocabulary,
)

SEEDS = range(40)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(seed) for seed in SEEDS]


def test_same_seed_same_scene_and_different_seeds_differ() -> None:
    a, b, c = generate_scene(5), generate_scene(5), generate_scene(6)
    assert a.jpeg == b.jpeg and [o.category for o in a.objects] == [o.category for o in b.objects]
    assert a.jpeg != c.jpeg


def test_sizes_counts_and_vocabulary_within_the_stated_ranges(scenes) -> None:
    for scene in scenes:
        height, width = scene.size
        assert 240 <= height <= 512 and 240 <= width <= 512
        assert 1 <= len(scene.objects) <= 6
        for obj in scene.objects:
            assert obj.colour in COLOURS and obj.shape in BASE_SHAPES  # the star is held out
            x0, y0, x1, y1 = obj.box
            extent = max(x1 - x0, y1 - y0)
            # size = side / diameter <= 35 % of the short side; a square at 45 degrees spans sqrt(2) x that
            assert extent <= 0.35 * np.sqrt(2) * min(height, width) + 2


def test_ground_truth_masks_are_visible_parts_and_disjoint(scenes) -> None:
    for scene in scenes:
        union = np.zeros(scene.size, dtype=int)
        for obj in scene.objects:
            assert obj.area > 0
            ys, xs = np.nonzero(obj.mask)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.box
            union += obj.mask
        assert union.max() <= 1, "visible parts of different objects never overlap"


def test_object_pixels_have_their_colour_in_the_jpeg(scenes) -> None:
    for scene in scenes[:10]:
        for obj in scene.objects:
            inner = cv2.erode(obj.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if inner.sum() < 20:
                continue
            mean = scene.image[inner].mean(axis=0)
            assert np.abs(mean - np.asarray(COLOURS[obj.colour])).max() < 30, (obj.category, mean)


def test_placement_refuses_to_hide_more_than_40_percent_of_an_object() -> None:
    base = np.zeros((100, 100), dtype=bool)
    base[10:50, 10:50] = True  # area 1600
    covering = np.zeros_like(base)
    covering[10:50, 10:30] = True  # would hide 50 %
    nibbling = np.zeros_like(base)
    nibbling[10:50, 10:20] = True  # hides 25 %
    elsewhere = np.zeros_like(base)
    elsewhere[60:90, 60:90] = True
    assert not all_visible_enough([base], covering)
    assert all_visible_enough([base], nibbling)
    assert all_visible_enough([base], elsewhere)
    assert not all_visible_enough([base, nibbling], covering)  # cumulative cover counts
    assert not all_visible_enough([base], np.zeros_like(base))  # an empty shape is no object


def test_star_scenes_hold_a_star_and_prompts_match_as_documented() -> None:
    for seed in range(10):
        scene = generate_scene(seed, SceneOptions(shapes=ALL_SHAPES, require_shape="star"))
        assert any(o.shape == "star" for o in scene.objects)
    assert prompt_matches("red circle", "red", "circle") and prompt_matches("circle", "blue", "circle")
    assert not prompt_matches("red circle", "blue", "circle") and not prompt_matches("person", "red", "circle")
    assert vocabulary(BASE_SHAPES)[:2] == ["red circle", "green circle"] and "triangle" in vocabulary()


def test_coco_dataset_round_trips_through_pycocotools(tmp_path) -> None:
    out = write_scene_dataset(tmp_path / "set", 6, seed=3)
    coco = COCO(str(out / "annotations.json"))
    assert len(coco.getImgIds()) == 6 and len(coco.getCatIds()) == 18
    for image_id in coco.getImgIds():
        info = coco.loadImgs(image_id)[0]
        scene = generate_scene(info["scene_seed"])
        assert (out / info["file_name"]).read_bytes() == scene.jpeg
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert len(anns) == len(scene.objects)
        for ann, obj in zip(anns, scene.objects):
            assert np.array_equal(coco.annToMask(ann).astype(bool), obj.mask)
            assert coco.loadCats(ann["category_id"])[0]["name"] == obj.category
