"""Accuracy of a model end to end, on any COCO instance-segmentation dataset.

Every image goes in as its file's bytes and every answer comes back as the result document
the CLI and the server return (``engines.postprocess.result_document``), so thresholds,
presence gating, mask upsampling and RLE are all part of what is measured. Category names are
the prompts (and, where the dataset asks for it, supercategory names: "circle" = every
circle); every prompt is asked of every image, so absent prompts are measured too.

Per prompt and image, detections with score >= ``score_threshold`` are matched greedily (by
score) to ground-truth masks at mask IoU >= ``iou_threshold``: precision, recall, mean IoU of
the matches, the share of absent (image, prompt) pairs that return any detection, and why each
false positive is one (duplicate, badly outlined, another kind of object, background). COCO
mask AP comes from pycocotools over the detections down to ``ap_score_floor``, one "category"
per prompt. torch-free: the PyTorch segmenter lives in ``benchmarks/torch_segmenter.py``.

With ``exemplars`` the prompts are boxes instead of words: for each category in an image, the box
of its first annotation is the one positive exemplar of a box-only prompt, and the ground truth
is every object of that category, the boxed one included ("one box on a red circle finds the red
circles"). There are no absent prompts in that mode.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# image bytes, prompts -> result document ({"results": [{"prompt", "detections": [...]}]}); a prompt
# is a text, or an exemplar entry {"boxes": [[x0, y0, x1, y1]], "labels": [1]} as POST /segment takes it
Segmenter = Callable[[bytes, list[Any]], dict[str, Any]]

GOALS = {"recall": 0.9, "precision": 0.9, "mean_iou": 0.85, "absent_with_detection": 0.03}
ANNOTATION_NAMES = ("annotations.json", "_annotations.coco.json")


@dataclass(frozen=True)
class AccuracyConfig:
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    ap_score_floor: float = 0.05  # detections below this are not returned (AP needs the low ones)
    max_detections: int = 20  # per prompt and image
    supercategory_prompts: bool | None = None  # None: as the dataset's info says
    limit: int | None = None  # first N images only
    exemplars: bool = False  # box-only prompts (one box per category in the image), not words


@dataclass(frozen=True)
class Dataset:
    root: Path  # where file_name paths are resolved
    annotations: Path
    coco: COCO
    prompts: list[str]
    prompt_categories: dict[str, set[int]]  # prompt -> category ids it refers to
    groups: dict[str, list[str]]  # group name -> prompts


def find_annotations(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ANNOTATION_NAMES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.json"))
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"no COCO annotations in {path} (looked for {', '.join(ANNOTATION_NAMES)})")


def load_dataset(path: str | Path, supercategory_prompts: bool | None = None) -> Dataset:
    annotations = find_annotations(Path(path))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(annotations))
    cats = coco.loadCats(coco.getCatIds())
    if not cats:
        raise ValueError(f"{annotations} has no categories")
    prompt_categories: dict[str, set[int]] = {}
    for cat in cats:
        prompt_categories.setdefault(str(cat["name"]).strip(), set()).add(int(cat["id"]))
    if supercategory_prompts is None:
        supercategory_prompts = bool(coco.dataset.get("info", {}).get("shapes"))  # our generated sets
    groups: dict[str, list[str]] = {"all": list(prompt_categories)}
    supers: dict[str, set[int]] = {}
    for cat in cats:
        if cat.get("supercategory"):
            supers.setdefault(str(cat["supercategory"]).strip(), set()).add(int(cat["id"]))
    for name, ids in supers.items():
        members = [p for p, pids in prompt_categories.items() if pids <= ids]
        if supercategory_prompts and name not in prompt_categories:
            prompt_categories[name] = set(ids)
            members.append(name)
        groups[name] = members
    groups["all"] = list(prompt_categories)
    return Dataset(root=annotations.parent, annotations=annotations, coco=coco, prompts=list(prompt_categories),
                   prompt_categories=prompt_categories, groups=groups)


def _image_path(dataset: Dataset, info: dict[str, Any]) -> Path:
    for candidate in (dataset.root / info["file_name"], dataset.root / "images" / info["file_name"]):
        if candidate.is_file():
            return candidate
    raise ValueError(f"image {info['file_name']} not found under {dataset.root}")


def evaluate(segment: Segmenter, dataset: Dataset, config: AccuracyConfig = AccuracyConfig(),
             progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    coco = dataset.coco
    image_ids = sorted(coco.getImgIds())[: config.limit]
    prompts = dataset.prompts
    per_prompt = {p: _Counts() for p in prompts}
    detections: list[dict[str, Any]] = []
    gt_annotations: list[dict[str, Any]] = []
    started = time.perf_counter()
    prompt_ids = {p: i for i, p in enumerate(prompts, start=1)}
    for done, image_id in enumerate(image_ids):
        info = coco.loadImgs(image_id)[0]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id, iscrowd=None))
        asked: list[str] = list(prompts)
        sent: list[Any] = list(prompts)
        if config.exemplars:
            asked, sent = _exemplar_prompts(dataset, anns)
        doc = segment(_image_path(dataset, info).read_bytes(), sent) if sent else {"results": []}
        results = doc["results"]
        names = [r["prompt"] for r in results]
        if len(results) != len(asked) or (not config.exemplars and names != asked):
            raise ValueError("the segmenter answered other prompts than it was asked")
        rles = [coco.annToRLE(a) for a in anns]  # once per image: every prompt splits them into its own / others
        for prompt, result in zip(asked, results):
            prompt_id = prompt_ids[prompt]
            wanted = dataset.prompt_categories[prompt]
            gts = [a for a in anns if a["category_id"] in wanted]
            gt_rles = [r for a, r in zip(anns, rles) if a["category_id"] in wanted]
            others = [r for a, r in zip(anns, rles) if a["category_id"] not in wanted]
            for a in gts:
                gt_annotations.append({**a, "id": len(gt_annotations) + 1, "category_id": prompt_id})
            dets = [d for d in result["detections"] if d["score"] >= config.ap_score_floor]
            for d in dets:
                detections.append({"image_id": image_id, "category_id": prompt_id, "score": float(d["score"]),
                                   "segmentation": _rle(d["mask"])})
            kept = [d for d in dets if d["score"] >= config.score_threshold]
            per_prompt[prompt].add(kept, gt_rles, config.iou_threshold, others)
        if progress is not None:
            progress(done + 1, len(image_ids))
    seconds = time.perf_counter() - started

    group_members = dataset.groups
    if config.exemplars:  # one box per category: supercategory prompts are not asked
        kinds = {str(c["name"]).strip() for c in coco.loadCats(coco.getCatIds())}
        group_members = {name: [p for p in members if p in kinds] for name, members in dataset.groups.items()}
    ap = _coco_ap(dataset, image_ids, gt_annotations, detections, group_members)
    groups = {name: _summary([per_prompt[p] for p in members], ap.get(name)) for name, members in group_members.items()
              if members}
    overall = groups["all"]
    return {
        "kind": "accuracy",
        "mode": "exemplars" if config.exemplars else "text",
        "dataset": {"path": str(dataset.annotations), "images": len(image_ids), "prompts": prompts,
                    "objects": sum(c.objects for c in per_prompt.values())},
        "config": asdict(config),
        "overall": overall,
        "groups": groups,
        "per_prompt": {p: _summary([c], None) for p, c in per_prompt.items() if c.objects or c.absent},
        "group_members": group_members,
        "goals": [_goal(name, target, overall[name]) for name, target in GOALS.items()
                  if not (config.exemplars and name == "absent_with_detection")],
        "timing": {"seconds": round(seconds, 2), "images_per_s": round(len(image_ids) / max(seconds, 1e-9), 3)},
    }


def _exemplar_prompts(dataset: Dataset, anns: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(category name, box-only exemplar entry) per category in the image: its first annotation's box."""
    names = {int(c["id"]): str(c["name"]).strip() for c in dataset.coco.loadCats(dataset.coco.getCatIds())}
    first: dict[str, dict[str, Any]] = {}
    for ann in sorted(anns, key=lambda a: int(a["id"])):
        first.setdefault(names[int(ann["category_id"])], ann)
    asked = sorted(first)
    entries = []
    for name in asked:
        x, y, w, h = (float(v) for v in first[name]["bbox"])
        entries.append({"boxes": [[x, y, x + w, y + h]], "labels": [1]})
    return asked, entries


# Why a detection over the score threshold is not a true positive (TIDE's error types, simplified),
# first that applies: it hits an object of the prompt already found (duplicate); it overlaps one by
# LOCALISATION_IOU or more but less than the match IoU (found, badly outlined); it overlaps an object
# of another kind that much (confusion); or nothing (background).
LOCALISATION_IOU = 0.1
FALSE_POSITIVE_KINDS = ("duplicate", "localisation", "confusion", "background")


class _Counts:
    def __init__(self) -> None:
        self.tp = self.fp = self.objects = 0
        self.ious: list[float] = []
        self.absent = self.absent_with_detection = 0
        self.fp_kinds = dict.fromkeys(FALSE_POSITIVE_KINDS, 0)

    def add(self, kept: list[dict[str, Any]], gt_rles: list[dict[str, Any]], iou_threshold: float,
            other_rles: Sequence[dict[str, Any]] = ()) -> None:
        """``kept``: detections in descending score order; ``other_rles``: the image's other objects."""
        self.objects += len(gt_rles)
        if not gt_rles:
            self.absent += 1
            self.absent_with_detection += int(bool(kept))
        if not kept:
            return
        masks = [_rle(d["mask"]) for d in kept]
        ious = _ious(masks, gt_rles)
        others = _ious(masks, list(other_rles))
        taken = np.zeros(len(gt_rles), dtype=bool)
        for row, other in zip(ious, others):
            candidates = np.where(~taken & (row >= iou_threshold), row, -1.0)
            best = int(np.argmax(candidates)) if row.size else 0
            if row.size and candidates[best] >= iou_threshold:
                taken[best] = True
                self.tp += 1
                self.ious.append(float(row[best]))
                continue
            self.fp += 1
            if row.size and row.max() >= iou_threshold:
                kind = "duplicate"
            elif row.size and row.max() >= LOCALISATION_IOU:
                kind = "localisation"
            elif other.size and other.max() >= LOCALISATION_IOU:
                kind = "confusion"
            else:
                kind = "background"
            self.fp_kinds[kind] += 1


def _ious(masks: list[dict[str, Any]], gts: list[dict[str, Any]]) -> np.ndarray:
    """Mask IoU [detections, objects] (zero columns when there are no objects)."""
    if not gts:
        return np.zeros((len(masks), 0))
    return np.asarray(mask_utils.iou(masks, gts, [0] * len(gts))).reshape(len(masks), len(gts))


def _summary(counts: Sequence[_Counts], ap: dict[str, float] | None) -> dict[str, Any]:
    tp = sum(c.tp for c in counts)
    fp = sum(c.fp for c in counts)
    objects = sum(c.objects for c in counts)
    ious = [i for c in counts for i in c.ious]
    absent = sum(c.absent for c in counts)
    absent_hit = sum(c.absent_with_detection for c in counts)
    out = {
        "precision": round(tp / (tp + fp), 4) if tp + fp else 1.0,
        "recall": round(tp / objects, 4) if objects else 1.0,
        "mean_iou": round(float(np.mean(ious)), 4) if ious else 0.0,
        "absent_with_detection": round(absent_hit / absent, 4) if absent else 0.0,
        "true_positives": tp, "false_positives": fp, "objects": objects, "absent_pairs": absent,
        "false_positive_kinds": {k: sum(c.fp_kinds[k] for c in counts) for k in FALSE_POSITIVE_KINDS},
    }
    if ap is not None:
        out.update(ap)
    return out


def _coco_ap(dataset: Dataset, image_ids: list[int], gt_annotations: list[dict[str, Any]],
             detections: list[dict[str, Any]], groups: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """COCO mask AP with one category per prompt, for every group of prompts."""
    gt = COCO()
    gt.dataset = {"images": dataset.coco.loadImgs(image_ids), "annotations": gt_annotations,
                  "categories": [{"id": i, "name": p} for i, p in enumerate(dataset.prompts, start=1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(detections) if detections else COCO()
    out: dict[str, dict[str, float]] = {}
    ids = {p: i for i, p in enumerate(dataset.prompts, start=1)}
    for name, members in groups.items():
        if not members:
            continue
        if not detections:
            out[name] = {"ap": 0.0, "ap50": 0.0}
            continue
        evaluator = COCOeval(gt, dt, iouType="segm")
        evaluator.params.imgIds = image_ids
        evaluator.params.catIds = [ids[p] for p in members]
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        # -1 means "no ground truth": reported as 0 rather than a negative AP
        out[name] = {"ap": round(max(float(evaluator.stats[0]), 0.0) * 100, 2),
                     "ap50": round(max(float(evaluator.stats[1]), 0.0) * 100, 2)}
    return out


def _rle(mask: dict[str, Any]) -> dict[str, Any]:
    if mask is None or mask.get("format") != "rle":
        raise ValueError("the accuracy command needs RLE masks in the result documents")
    return {"size": list(mask["size"]), "counts": mask["counts"].encode("ascii")
            if isinstance(mask["counts"], str) else mask["counts"]}


def _goal(name: str, target: float, measured: float) -> dict[str, Any]:
    lower_is_better = name == "absent_with_detection"
    met = measured <= target if lower_is_better else measured >= target
    return {"name": name, "target": ("<= " if lower_is_better else ">= ") + str(target), "measured": measured,
            "met": bool(met)}


# ------------------------------------------------------------------------------------------------
# Segmenters
# ------------------------------------------------------------------------------------------------
def pipeline_segmenter(bundle: str | Path, backend: str = "auto", config: AccuracyConfig = AccuracyConfig(),
                       max_prompts: int = 64) -> tuple[Segmenter, dict[str, Any]]:
    """Our runtime: bytes -> Sam3Pipeline.segment -> result document (what the server returns)."""
    from engines.options import SegmentOptions
    from engines.pipeline import Sam3Pipeline
    from engines.postprocess import result_document

    pipe = Sam3Pipeline.from_bundle(bundle, backend, max_prompts=max_prompts)

    options = SegmentOptions(score_threshold=config.ap_score_floor, max_detections=config.max_detections)

    def segment(image: bytes, prompts: list[Any]) -> dict[str, Any]:
        result = pipe.segment(image, [_exemplar(p) if isinstance(p, dict) else p for p in prompts], options)
        return result_document(result.image_size, result.results, "rle")

    manifest = pipe.manifest
    model = {"kind": "bundle", "bundle": str(bundle), "name": manifest.name, "backend": pipe.backend.kind,
             "precision": pipe.backend.precision,
             "quantization": (manifest.export.get("quantization") or {}).get("method")}
    return segment, model


def _exemplar(entry: Any) -> Any:
    """A text or an exemplar entry (the API's JSON form) as the pipeline takes it."""
    from engines.types import Prompt

    if isinstance(entry, str):
        return Prompt(text=entry)
    return Prompt.from_wire(entry["boxes"], entry.get("labels"), entry.get("text"))


def http_segmenter(url: str, config: AccuracyConfig = AccuracyConfig(),
                   api_key: str | None = None) -> tuple[Segmenter, dict[str, Any]]:
    """The same through a running server's POST /segment (multipart)."""
    import httpx

    client = httpx.Client(base_url=url, timeout=120.0, headers={"x-api-key": api_key} if api_key else {})

    def segment(image: bytes, prompts: list[Any]) -> dict[str, Any]:
        if any(isinstance(p, dict) for p in prompts):  # exemplar entries: the JSON form
            import base64

            body = {"image": base64.b64encode(image).decode("ascii"), "prompts": prompts,
                    "score_threshold": config.ap_score_floor, "max_detections": config.max_detections}
            response = client.post("/segment", json=body)
            response.raise_for_status()
            return response.json()
        data = {"prompt": list(prompts), "score_threshold": str(config.ap_score_floor),
                "max_detections": str(config.max_detections)}
        response = client.post("/segment", files={"image": ("image.jpg", image, "image/jpeg")}, data=data)
        response.raise_for_status()
        return response.json()

    info = client.get("/info").json() if client.get("/info").status_code == 200 else {}
    return segment, {"kind": "http", "url": url, "info": info.get("model", info)}


def markdown(doc: dict[str, Any]) -> str:
    model = doc.get("model", {})
    lines = [f"### Accuracy: {model.get('name', model.get('kind', '?'))} ({model.get('backend', model.get('kind', ''))}"
             f"{', ' + str(model.get('precision')) if model.get('precision') else ''})",
             "",
             (f"{doc['dataset']['images']} images, one box-only exemplar prompt per category in the image "
              "(the box of its first object), "
              if doc.get("mode") == "exemplars" else
              f"{doc['dataset']['images']} images, {len(doc['dataset']['prompts'])} prompts per image, ") +
             f"{doc['dataset']['objects']} objects; score >= {doc['config']['score_threshold']}, "
             f"mask IoU >= {doc['config']['iou_threshold']}.",
             "",
             "| group | precision | recall | mean IoU | absent with a detection | mask AP | AP50 |",
             "|---|---|---|---|---|---|---|"]
    for name, g in doc["groups"].items():
        lines.append(f"| {name} | {g['precision']:.3f} | {g['recall']:.3f} | {g['mean_iou']:.3f} | "
                     f"{g['absent_with_detection'] * 100:.1f} % | {g.get('ap', 0):.1f} | {g.get('ap50', 0):.1f} |")
    kinds = _false_positive_kinds(doc["overall"])
    if kinds:
        lines += ["", f"False positives ({doc['overall']['false_positives']}): {kinds}"
                  f" (localisation: overlaps an object of the prompt by IoU >= {LOCALISATION_IOU} but under the "
                  "match IoU; confusion: overlaps an object of another kind; background: neither)."]
    lines += ["", "| goal | target | measured | met |", "|---|---|---|---|"]
    for goal in doc["goals"]:
        lines.append(f"| {goal['name']} | {goal['target']} | {goal['measured']} | {'yes' if goal['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Summary of a set of reports (make accuracy)
# ------------------------------------------------------------------------------------------------
SUMMARY_ROWS = (
    ("accuracy-pytorch.json", "PyTorch (transformers Sam3Model, fp32)", "all"),
    ("accuracy-bundle-paired.json", "bundle, ONNX Runtime fp32, the PyTorch run's images", "all"),
    ("accuracy-bundle.json", "bundle, ONNX Runtime fp32", "all"),
    ("accuracy-shifted.json", "bundle, ONNX Runtime fp32, second scene family (scenes/shifted.py)", "all"),
    ("accuracy-fp16emu.json", "bundle, TensorRT FP16 emulated on CPU", "all"),
    ("accuracy-int8.json", "bundle, int8 CPU mode (image encoder)", "all"),
    ("accuracy-exemplars.json", "bundle, one exemplar box per kind (no text)", "all"),
    ("accuracy-lora-base-concepts.json", "star LoRA merged: base concepts", "all"),
    ("accuracy-star-before.json", "base model on star scenes: 'star' prompts", "star"),
    ("accuracy-star-after.json", "star LoRA merged on star scenes: 'star' prompts", "star"),
    ("accuracy-star-before.json", "base model on star scenes: other prompts", "-star"),
    ("accuracy-star-after.json", "star LoRA merged on star scenes: other prompts", "-star"),
)


def summary_markdown(directory: str | Path, same_weights: Sequence[tuple[str, str]] = ()) -> str:
    """One table over the reports ``make accuracy`` writes, with the goals and the deltas."""
    directory = Path(directory)
    docs = {name: json.loads((directory / name).read_text()) for name, _, _ in SUMMARY_ROWS
            if (directory / name).is_file()}
    lines = ["| model | group | images | precision | recall | mean IoU | absent with a detection | mask AP | AP50 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, label, group in SUMMARY_ROWS:
        if name not in docs:
            continue
        g = _group(docs[name], group)
        if g is None:
            continue
        lines.append(f"| {label} | {group} | {docs[name]['dataset']['images']} | {g['precision']:.3f} | "
                     f"{g['recall']:.3f} | {g['mean_iou']:.3f} | {g['absent_with_detection'] * 100:.1f} % | "
                     f"{_fmt(g.get('ap'))} | {_fmt(g.get('ap50'))} |")
    lines += ["", "Goals (shipped bundle at score >= 0.5; mask IoU >= 0.5 for a match):", "",
              "| goal | target | measured | met |", "|---|---|---|---|"]
    if "accuracy-bundle.json" in docs:
        for goal in docs["accuracy-bundle.json"]["goals"]:
            lines.append(f"| {goal['name']} | {goal['target']} | {goal['measured']} | {'yes' if goal['met'] else 'NO'} |")
        overall = docs["accuracy-bundle.json"]["overall"]
        kinds = _false_positive_kinds(overall)
        if kinds:
            lines += ["", f"Why the shipped bundle's {overall['false_positives']} false positives are false "
                      f"(score >= 0.5): {kinds}."]

    def ap(name: str, group: str = "all") -> float | None:
        g = _group(docs[name], group) if name in docs else None
        return None if g is None else g.get("ap")

    # PyTorch may have been measured on the first N images only: compare it with the bundle on those
    paired = "accuracy-bundle-paired.json" if "accuracy-bundle-paired.json" in docs else "accuracy-bundle.json"
    deltas = [
        ("bundle AP - PyTorch AP (same images)", ap(paired), ap("accuracy-pytorch.json"), "within 0.5"),
        ("FP16 emulation AP - bundle AP", ap("accuracy-fp16emu.json"), ap("accuracy-bundle.json"), "within 1"),
        ("int8 AP - bundle AP", ap("accuracy-int8.json"), ap("accuracy-bundle.json"), "(measured)"),
        ("second scene family AP - bundle AP", ap("accuracy-shifted.json"), ap("accuracy-bundle.json"), "within 5"),
        ("LoRA base-concept AP - base AP", ap("accuracy-lora-base-concepts.json"), ap("accuracy-bundle.json"),
         "drop <= 2"),
    ]
    lines += ["", "| comparison | delta (AP points) | goal |", "|---|---|---|"]
    for label, a, b, goal in deltas:
        if a is not None and b is not None:
            lines.append(f"| {label} | {a - b:+.2f} | {goal} |")
    before, after = _group(docs.get("accuracy-star-before.json", {}), "star"), _group(
        docs.get("accuracy-star-after.json", {}), "star")
    if before and after:
        lines.append(f"| 'star' recall: base -> LoRA | {before['recall']:.3f} -> {after['recall']:.3f} | "
                     "base ~0, LoRA >= 0.85 |")
    for a, b in same_weights:
        same = _weights(Path(a)) == _weights(Path(b))
        lines.append(f"| weights hashes of {Path(a).name} vs {Path(b).name} | {'identical' if same else 'DIFFER'} | "
                     "identical |")
    return "\n".join(lines) + "\n"


def _false_positive_kinds(summary: dict[str, Any]) -> str:
    """"duplicate 0, localisation 56, ..." for a summary with false positives ("" otherwise)."""
    kinds = summary.get("false_positive_kinds")
    if not kinds or not summary["false_positives"]:
        return ""
    return ", ".join(f"{k} {v}" for k, v in kinds.items())


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _group(doc: dict[str, Any], group: str) -> dict[str, Any] | None:
    """A group of a report; ``-name`` is every prompt outside group ``name`` (pooled counts, no AP)."""
    if not doc:
        return None
    if not group.startswith("-"):
        return doc["groups"].get(group)
    excluded = set(doc["groups"].get(group[1:], {}) and _members(doc, group[1:]))
    rows = [v for p, v in doc["per_prompt"].items() if p not in excluded]
    tp = sum(r["true_positives"] for r in rows)
    fp = sum(r["false_positives"] for r in rows)
    objects = sum(r["objects"] for r in rows)
    absent = sum(r["absent_pairs"] for r in rows)
    absent_hit = sum(round(r["absent_with_detection"] * r["absent_pairs"]) for r in rows)
    ious = [(r["mean_iou"], r["true_positives"]) for r in rows if r["true_positives"]]
    return {"precision": tp / (tp + fp) if tp + fp else 1.0, "recall": tp / objects if objects else 1.0,
            "mean_iou": sum(m * n for m, n in ious) / max(sum(n for _, n in ious), 1),
            "absent_with_detection": absent_hit / absent if absent else 0.0}


def _members(doc: dict[str, Any], group: str) -> list[str]:
    return list(doc.get("group_members", {}).get(group, []))


def _weights(bundle: Path) -> dict[str, str]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {name: part["weights_sha256"] for name, part in manifest["parts"].items()}
