"""SAM3's detection objective: Hungarian matching, then class / box / mask / presence losses.

Per prompt, predictions (queries) are matched one-to-one to the prompt's ground-truth objects
by the usual DETR cost (classification + L1 + GIoU on boxes). Matched queries learn their
object's box (L1 + GIoU) and mask (BCE + dice); every query learns whether it is matched
(sigmoid BCE); the presence token learns whether the prompt is in the image at all (BCE).
Absent prompts have no matches, so they teach every query and the presence token "no".
Box and class losses apply to every decoder layer (deep supervision), masks to the last.
The intermediate layers may match one-to-many (each object to ``aux_copies`` queries, H-DETR's
hybrid-layer scheme; the last layer, which alone answers, stays one-to-one). Measured on the
demo model: 3400 base steps with 3 copies made the classification head, which all layers
share, under-confident (the best detection of a present prompt scored 0.15 on average, 0.25 at
most: nothing passed 0.5), and 500 one-to-one steps after it did not recalibrate it (0.16); so
the base run matches one-to-one, and only the short exemplar fine-tune used 3 copies.
The semantic-segmentation head learns the union of the prompt's objects (empty when absent):
a dense signal that makes the prompt condition the image features from the first steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import generalized_box_iou

from training.forward import TrainOutputs


@dataclass(frozen=True)
class LossWeights:
    cls: float = 2.0
    l1: float = 5.0
    giou: float = 2.0
    mask_bce: float = 5.0
    dice: float = 5.0
    presence: float = 2.0
    semantic_bce: float = 2.0
    semantic_dice: float = 2.0
    aux_copies: int = 1  # queries matched to each object in the intermediate decoder layers (1: one-to-one)


@dataclass
class Targets:
    """Ground truth of N prompts: boxes [K_n, 4] normalised xyxy, masks [K_n, h, w] in [0, 1]."""

    boxes: list[torch.Tensor]
    masks: list[torch.Tensor]


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: Targets,
                    weights: LossWeights, copies: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query indices, target indices) per prompt, for one decoder layer ([N, Q], [N, Q, 4]).

    With ``copies`` > 1 each object is matched to that many queries (fewer when the queries run out).
    """
    matches = []
    prob = logits.sigmoid()
    for n, gt in enumerate(targets.boxes):
        if gt.shape[0] == 0:
            matches.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))
            continue
        cost = (-weights.cls * prob[n][:, None]
                + weights.l1 * torch.cdist(boxes[n], gt, p=1)
                - weights.giou * generalized_box_iou(boxes[n], gt))
        repeat = max(1, min(copies, prob.shape[1] // gt.shape[0]))
        rows, cols = linear_sum_assignment(cost.repeat(1, repeat).numpy())
        matches.append((rows.astype(np.int64), (cols % gt.shape[0]).astype(np.int64)))
    return matches


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    numerator = 2 * (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


def detection_loss(out: TrainOutputs, targets: Targets, weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """Weighted losses (``total`` is what backpropagates) averaged over layers / objects."""
    layers, count, queries = out.logits.shape
    num_objects = max(sum(int(b.shape[0]) for b in targets.boxes), 1)
    present = torch.tensor([float(b.shape[0] > 0) for b in targets.boxes])
    terms = {k: out.logits.new_zeros(()) for k in ("cls", "l1", "giou", "presence", "mask_bce", "dice",
                                                  "semantic_bce", "semantic_dice")}
    last_matches = None
    for layer in range(layers):
        logits, boxes = out.logits[layer], out.boxes[layer]
        copies = 1 if layer == layers - 1 else weights.aux_copies
        matches = hungarian_match(logits.detach(), boxes.detach(), targets, weights, copies)
        cls_target = torch.zeros_like(logits)
        matched_pred, matched_gt = [], []
        for n, (rows, cols) in enumerate(matches):
            if rows.size:
                cls_target[n, rows] = 1.0
                matched_pred.append(boxes[n, rows])
                matched_gt.append(targets.boxes[n][cols])
        # Sum over queries, normalised by objects (DETR): absent prompts still teach "no".
        terms["cls"] = terms["cls"] + F.binary_cross_entropy_with_logits(
            logits, cls_target, reduction="sum") / num_objects
        if matched_pred:
            pred, gt = torch.cat(matched_pred), torch.cat(matched_gt)
            terms["l1"] = terms["l1"] + F.l1_loss(pred, gt, reduction="sum") / num_objects
            terms["giou"] = terms["giou"] + (1 - torch.diag(generalized_box_iou(pred, gt))).sum() / num_objects
        terms["presence"] = terms["presence"] + F.binary_cross_entropy_with_logits(
            out.presence[layer].reshape(-1), present)
        last_matches = matches

    assert last_matches is not None
    pred_masks, gt_masks = [], []
    for n, (rows, cols) in enumerate(last_matches):
        if rows.size:
            pred_masks.append(out.masks[n, rows])
            gt_masks.append(targets.masks[n][cols])
    if pred_masks:
        pred, gt = torch.cat(pred_masks), torch.cat(gt_masks)
        terms["mask_bce"] = F.binary_cross_entropy_with_logits(pred, gt, reduction="none").flatten(1).mean(1).sum() / num_objects
        terms["dice"] = dice_loss(pred, gt).sum() / num_objects
    size = out.semantic.shape[-2:]
    semantic_target = torch.stack([m.amax(0) if m.shape[0] else out.semantic.new_zeros(size) for m in targets.masks])
    semantic = out.semantic[:, 0]
    terms["semantic_bce"] = F.binary_cross_entropy_with_logits(semantic, semantic_target)
    present_rows = present.bool()
    if present_rows.any():
        terms["semantic_dice"] = dice_loss(semantic[present_rows], semantic_target[present_rows]).mean()
    for key in ("cls", "l1", "giou", "presence"):
        terms[key] = terms[key] / layers
    total = sum(getattr(weights, key) * value for key, value in terms.items())
    return {"total": total, **terms}
