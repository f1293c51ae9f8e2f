"""Accuracy end to end: the metric code on known answers, and the shipped model through the
CLI-exported bundle, the pipeline and the server (bounds a little below the published goals)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from benchmarks.__main__ import main as bench_main
from benchmarks.accuracy import AccuracyConfig, evaluate, http_segmenter, load_dataset, pipeline_segmenter
from engines.bundle import Bundle, sha256_file, write_manifest
from scenes.coco import write_scene_dataset
from scenes.generator import generate_scene

# The recall goal (>= 0.9) is NOT met by the shipped model (benchmarks/results/accuracy.md:
# mask AP 74.5, recall 0.84, precision 0.93, absent prompts answered 0.4 % on 200 scenes). These
# bounds guard what it does reach, a little below the measured figures, so a regression (or a
# broken export, threshold, presence gating, upsampling or RLE) fails them; raise them with the
# model. The absent rate keeps a wide bound: on 20 scenes it moves by whole prompts (measured
# 0.3 %: 1 of 308).
BOUNDS = {"ap": 76.0, "ap50": 92.0, "precision": 0.92, "recall": 0.83, "mean_iou": 0.85,
          "absent_with_detection": 0.05}  # measured: 81.7, 97.4, 0.957, 0.854, 0.898, 0.003
# One box per kind, no text (measured on the same 20 scenes: AP 82.9, AP50 96.6; the base model
# before its exemplar fine-tunes: AP 0.4 on 50 scenes).
EXEMPLAR_BOUNDS = {"ap": 77.0, "ap50": 91.0}


def bound_failures(overall: dict) -> list[str]:
    failures = [f"{k} {overall[k]} < {v}" for k, v in BOUNDS.items() if k != "absent_with_detection" and overall[k] < v]
    if overall["absent_with_detection"] > BOUNDS["absent_with_detection"]:
        failures.append(f"absent_with_detection {overall['absent_with_detection']} > {BOUNDS['absent_with_detection']}")
    return failures


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """The first 20 scenes of the published 200-scene held-out set (same seed)."""
    return write_scene_dataset(tmp_path_factory.mktemp("data") / "heldout", 20, seed=7)


@pytest.fixture(scope="module")
def star_scenes(tmp_path_factory) -> Path:
    return write_scene_dataset(tmp_path_factory.mktemp("data") / "stars", 20, seed=8,
                               shapes=("circle", "square", "triangle", "star"), require_shape="star")


# ------------------------------------------------------------------------------ metric code
def _oracle(dataset_dir: Path, *, drop_every: int = 0, absent_noise: bool = False, duplicate: bool = False,
            grow: int = 0):
    """A segmenter that answers from the generator's ground truth (optionally wrong on purpose)."""
    annotations = json.loads((dataset_dir / "annotations.json").read_text())
    by_file = {Path(i["file_name"]).name: i["scene_seed"] for i in annotations["images"]}
    jpeg_to_seed = {(dataset_dir / "images" / name).read_bytes(): seed for name, seed in by_file.items()}
    counter = {"n": 0}

    def segment(image: bytes, prompts: list) -> dict:
        scene = generate_scene(jpeg_to_seed[image])
        results = []
        for prompt in prompts:
            dets = []
            if isinstance(prompt, dict):  # one exemplar box: everything of the boxed object's kind
                (box,) = prompt["boxes"]
                boxed = min(scene.objects, key=lambda o: float(np.abs(np.subtract(o.box, box)).max()))
                prompt = boxed.category
            for k in scene.matching(prompt):
                counter["n"] += 1
                if drop_every and counter["n"] % drop_every == 0:
                    continue
                mask = scene.objects[k].mask.astype(np.uint8)
                if grow:  # the object and a band around it: found, badly outlined
                    mask = cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
                rle = mask_utils.encode(np.asfortranarray(mask))
                det = {"score": 0.9, "box": list(scene.objects[k].box),
                       "mask": {"format": "rle", "size": list(scene.size), "counts": rle["counts"].decode()}}
                dets += [det, {**det, "score": 0.8}] if duplicate else [det]
            if absent_noise and not dets and scene.objects:
                rle = mask_utils.encode(np.asfortranarray(scene.objects[0].mask.astype(np.uint8)))
                dets.append({"score": 0.6, "box": [0, 0, 1, 1],
                             "mask": {"format": "rle", "size": list(scene.size), "counts": rle["counts"].decode()}})
            results.append({"prompt": prompt, "detections": dets})
        return {"results": results}

    return segment


def test_ground_truth_answers_score_perfectly(heldout) -> None:
    doc = evaluate(_oracle(heldout), load_dataset(heldout))
    overall = doc["overall"]
    assert overall["recall"] == 1.0 and overall["precision"] == 1.0 and overall["mean_iou"] == 1.0
    assert overall["absent_with_detection"] == 0.0 and overall["ap"] == pytest.approx(100.0, abs=0.5)
    assert "circle" in doc["dataset"]["prompts"] and "red circle" in doc["dataset"]["prompts"]
    assert all(goal["met"] for goal in doc["goals"])


def test_missed_objects_and_answers_to_absent_prompts_are_counted(heldout) -> None:
    dataset = load_dataset(heldout)
    missed = evaluate(_oracle(heldout, drop_every=4), dataset)["overall"]
    assert 0.7 < missed["recall"] < 0.8 and missed["precision"] == 1.0
    noisy = evaluate(_oracle(heldout, absent_noise=True), dataset)["overall"]
    assert noisy["absent_with_detection"] == 1.0 and noisy["precision"] < 0.5 and noisy["recall"] == 1.0
    # an absent prompt answered with another kind's object is a confusion, never a localisation error
    assert noisy["false_positive_kinds"]["confusion"] == noisy["false_positives"] > 0


def test_false_positives_are_told_apart_by_kind(heldout) -> None:
    dataset = load_dataset(heldout)
    twice = evaluate(_oracle(heldout, duplicate=True), dataset)["overall"]
    assert twice["recall"] == 1.0 and twice["false_positives"] == twice["true_positives"]
    assert twice["false_positive_kinds"] == {"duplicate": twice["false_positives"], "localisation": 0,
                                             "confusion": 0, "background": 0}
    # masks grown by 25 px all round: every object is overlapped, few by IoU >= 0.5
    grown = evaluate(_oracle(heldout, grow=25), dataset)["overall"]
    kinds = grown["false_positive_kinds"]
    assert grown["recall"] < 0.5 and kinds["localisation"] > 0.9 * grown["false_positives"]
    assert kinds["duplicate"] == 0


def test_exemplar_mode_boxes_one_object_per_kind_and_counts_all_of_that_kind(heldout) -> None:
    dataset = load_dataset(heldout)
    doc = evaluate(_oracle(heldout), dataset, AccuracyConfig(exemplars=True))
    overall = doc["overall"]
    assert doc["mode"] == "exemplars" and overall["absent_pairs"] == 0
    assert overall["recall"] == 1.0 and overall["precision"] == 1.0 and overall["ap"] == pytest.approx(100.0, abs=0.5)
    # every object is counted once: as many as the dataset holds
    assert overall["objects"] == len(dataset.coco.getAnnIds())
    assert set(doc["group_members"]["all"]) <= {c["name"] for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    missed = evaluate(_oracle(heldout, drop_every=3), dataset, AccuracyConfig(exemplars=True))["overall"]
    assert missed["recall"] < 0.7


def test_cli_rejects_missing_inputs(tmp_path, capsys) -> None:
    assert bench_main(["accuracy", "--bundle", str(tmp_path / "nope"), "--scenes", "2"]) == 2
    assert "bundle not found" in capsys.readouterr().err
    assert bench_main(["accuracy", "--bundle", str(tmp_path), "--dataset", str(tmp_path / "nope")]) == 2


# ------------------------------------------------------------------------------ shipped model
@pytest.fixture(scope="module")
def shipped_report(shapes_bundle, heldout) -> dict:
    segment, model = pipeline_segmenter(shapes_bundle, "onnxruntime")
    return evaluate(segment, load_dataset(heldout))


def test_shipped_model_segments_the_held_out_scenes(shipped_report) -> None:
    overall = shipped_report["overall"]
    assert bound_failures(overall) == [], overall
    assert overall["true_positives"] > 0, overall


def test_one_box_finds_the_other_objects_of_its_kind(shapes_bundle, heldout) -> None:
    doc = evaluate(pipeline_segmenter(shapes_bundle, "onnxruntime")[0], load_dataset(heldout),
                   AccuracyConfig(exemplars=True))
    overall = doc["overall"]
    assert [f"{k} {overall[k]} < {v}" for k, v in EXEMPLAR_BOUNDS.items() if overall[k] < v] == [], overall


def test_the_same_check_fails_on_perturbed_weights(shapes_bundle, heldout, tmp_path) -> None:
    """The bounds can fail: the same bundle with noise on its decoder weights does not clear them."""
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "perturbed"
    shutil.copytree(shapes_bundle, broken)
    bundle = Bundle(broken)
    path = bundle.part_path("decoder")
    graph = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 64:
            noisy = array + rng.normal(0, 0.5 * float(array.std()) + 1e-3, array.shape).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    onnx.save(graph, str(path))
    from dataclasses import replace

    manifest = bundle.manifest
    parts = dict(manifest.parts)
    parts["decoder"] = replace(parts["decoder"], sha256=sha256_file(path), weights_sha256="perturbed")
    write_manifest(broken, replace(manifest, parts=parts))
    segment, _ = pipeline_segmenter(broken, "onnxruntime")
    overall = evaluate(segment, load_dataset(heldout), AccuracyConfig(limit=10))["overall"]
    assert bound_failures(overall), f"perturbed weights still clear the bounds: {overall}"


def test_served_model_answers_as_the_pipeline(shapes_bundle, heldout, tmp_path) -> None:
    from tests.server.conftest import ServerProcess

    # SAM3_MAX_MASKS: the server keeps at most max_masks // prompts detections per prompt (256 // 21
    # = 12 by default); room for the accuracy command's 20 each, so both sides are asked the same.
    env = {"SAM3_MAX_PROMPTS": "32", "SAM3_MAX_MASKS": str(32 * AccuracyConfig().max_detections)}
    server = ServerProcess(shapes_bundle, env=env, log_dir=tmp_path).wait_ready()
    try:
        segment, _ = http_segmenter(server.url)
        served = evaluate(segment, load_dataset(heldout), AccuracyConfig(limit=6))
    finally:
        server.stop()
    segment, _ = pipeline_segmenter(shapes_bundle, "onnxruntime")
    local = evaluate(segment, load_dataset(heldout), AccuracyConfig(limit=6))
    assert served["overall"] == local["overall"]
    assert served["per_prompt"] == local["per_prompt"]


def test_star_adapter_finds_the_stars_the_base_misses(shapes_bundle, star_bundle, star_scenes) -> None:
    """The LoRA merged at export teaches 'star' (measured on 200 scenes: star mask AP 0.1 -> 59.4,
    recall 0 -> 0.865, the goal of recall >= 0.85 met; on these 20: 0.0 -> 62.2, recall 0 ->
    0.93). The base model answers "star" with nothing at the threshold; its AP can be above 0
    because its queries outline stars as objects, at low scores."""
    dataset = load_dataset(star_scenes)
    base = evaluate(pipeline_segmenter(shapes_bundle, "onnxruntime")[0], dataset)["groups"]["star"]
    merged = evaluate(pipeline_segmenter(star_bundle, "onnxruntime")[0], dataset)["groups"]["star"]
    assert base["true_positives"] == 0 and base["ap"] <= 15.0, base
    assert merged["ap"] >= base["ap"] + 40.0 and merged["recall"] >= 0.75, (base, merged)
    manifest = Bundle(star_bundle).manifest
    assert "star" in manifest.card["vocabulary"] and manifest.source.loras
    assert manifest.part("image_encoder").weights_sha256 == Bundle(shapes_bundle).part("image_encoder").weights_sha256
