"""The second held-out family: seeded, in its own ranges, ground truth consistent with the
image, and not the training generator's images."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from scenes.coco import write_scene_dataset
from scenes.generator import BASE_SHAPES, COLOURS, generate_scene
from scenes.shifted import SIDE_RANGE, render_shifted_scene


@pytest.fixture(scope="module")
def scenes():
    return [render_shifted_scene(seed) for seed in range(30)]


def test_seeded_and_not_the_generators_scene() -> None:
    a, b = render_shifted_scene(4), render_shifted_scene(4)
    assert a.jpeg == b.jpeg and [o.category for o in a.objects] == [o.category for o in b.objects]
    assert a.jpeg != render_shifted_scene(5).jpeg
    assert a.size != generate_scene(4).size or a.jpeg != generate_scene(4).jpeg


def test_sizes_outside_the_training_range_occur_and_objects_are_the_vocabulary(scenes) -> None:
    sides = [side for scene in scenes for side in scene.size]
    assert min(sides) >= SIDE_RANGE[0] and max(sides) <= SIDE_RANGE[1]
    assert min(sides) < 240 and max(sides) > 512  # the generator draws 240-512 only
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 6
        assert all(o.colour in COLOURS and o.shape in BASE_SHAPES for o in scene.objects)


def test_masks_are_disjoint_visible_parts_with_their_colour(scenes) -> None:
    for scene in scenes:
        union = np.zeros(scene.size, dtype=int)
        for obj in scene.objects:
            assert obj.area > 0
            union += obj.mask
            inner = cv2.erode(obj.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if inner.sum() >= 20:
                mean = scene.image[inner].mean(axis=0)
                assert np.abs(mean - np.asarray(COLOURS[obj.colour])).max() < 40, (obj.category, mean)
        assert union.max() <= 1


def test_written_as_a_coco_set_that_names_its_family(tmp_path) -> None:
    out = write_scene_dataset(tmp_path / "shifted", 3, seed=2, family="shifted")
    doc = json.loads((out / "annotations.json").read_text())
    assert doc["info"]["family"] == "shifted"
    first = doc["images"][0]
    assert (out / first["file_name"]).read_bytes() == render_shifted_scene(first["scene_seed"]).jpeg
    with pytest.raises(ValueError, match="unknown scene family"):
        write_scene_dataset(tmp_path / "x", 1, family="nope")
