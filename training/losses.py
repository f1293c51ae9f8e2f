"""SAM3's detection objective: Hungarian matching, then class / box / mask / presence losses.

Per prompt, predictions (queries) are matched one-to-one to the prompt's ground-truth objects
by the usual DETR cost (classification + L1 + GIoU on boxes). Matched queries learn their
object's box (L1 + GIoU) and mask (BCE + dice); every query learns whether it is matched
(sigmoid BCE); the presence token learns whether the prompt is in the image at all (BCE).
Absent prompts have no matches, so they teach every query and the presence token "no" (with
``presence_gated_cls``, as Meta's SAM3 trains, only the presence token: queries then learn
which object is the prompt's, given that it is present, and are not pushed down by every
absent prompt; the served score is their product).
Box and class losses apply to every decoder layer (deep supervision), masks to the last.
The intermediate layers may match one-to-many (each object to ``aux_copies`` queries, H-DETR's
hybrid-layer scheme; the last layer, which alone answers, stays one-to-one). Measured on the
demo model: 3400 base steps with 3 copies made the classification head, which all layers
share, under-confident (the best detection of a present prompt scored 0.15 on average, 0.25 at
most: nothing passed 0.5), and 500 one-to-one steps after it did not recalibrate it (0.16); so
the base run matches one-to-one, and only the short exemplar fine-tune used 3 copies.
The semantic-segmentation head learns the union of the prompt's objects (empty when absent):
a dense signal that makes the prompt condition the image features from the first steps.

Everything is batched over layers, prompts and objects (targets padded to the most objects a
prompt has): the matching costs of a step are one tensor, copied to the host once for SciPy's
assignment, and each loss term is one gather and one reduction, so a GPU step is not bound by
per-prompt Python work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

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
    # Meta's SAM3 objective (use_presence): no query classification loss on prompts with no object;
    # the presence token alone learns "absent", and a query's score means "this is it, if present".
    presence_gated_cls: bool = False


@dataclass
class Targets:
    """Ground truth of N prompts: boxes [K_n, 4] normalised xyxy, masks [K_n, h, w] in [0, 1]."""

    boxes: list[torch.Tensor]
    masks: list[torch.Tensor]

    def padded(self) -> PaddedTargets:
        return PaddedTargets.from_lists(self.boxes, self.masks)


@dataclass
class PaddedTargets:
    """The same ground truth padded to K = max(K_n, 1): boxes [N, K, 4], masks [N, K, h, w]
    (empty when no masks were given), ``valid`` [N, K]."""

    boxes: torch.Tensor
    masks: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_lists(cls, boxes: list[torch.Tensor], masks: list[torch.Tensor]) -> PaddedTargets:
        count = len(boxes)
        most = max([int(b.shape[0]) for b in boxes] + [1])
        padded_boxes = torch.zeros(count, most, 4)
        valid = torch.zeros(count, most, dtype=torch.bool)
        mask_size = next((tuple(m.shape[-2:]) for m in masks), (0, 0))
        padded_masks = torch.zeros(count if masks else 0, most, *mask_size)
        for n, gt in enumerate(boxes):
            padded_boxes[n, :gt.shape[0]] = gt
            valid[n, :gt.shape[0]] = True
            if masks:
                padded_masks[n, :gt.shape[0]] = masks[n]
        return cls(padded_boxes, padded_masks, valid)

    def to(self, device: torch.device | str) -> PaddedTargets:
        return PaddedTargets(*(t.to(device, non_blocking=True) for t in (self.boxes, self.masks, self.valid)))

    @property
    def counts(self) -> torch.Tensor:
        return self.valid.sum(-1)


def _as_padded(targets: Targets | PaddedTargets) -> PaddedTargets:
    return targets if isinstance(targets, PaddedTargets) else targets.padded()


def generalized_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of xyxy boxes, broadcasting over leading dimensions.

    torchvision's ``generalized_box_iou`` is pairwise over 2-D inputs only, and its loss form
    indexes with a boolean mask (a host sync on a GPU); this is the same formula with clamps.
    """
    lt, rb = torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = (a[..., 2:] - a[..., :2]).prod(-1) + (b[..., 2:] - b[..., :2]).prod(-1) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).prod(-1)
    return inter / union - (hull - union) / hull


def matching_costs(logits: torch.Tensor, boxes: torch.Tensor, gt: torch.Tensor, weights: LossWeights) -> torch.Tensor:
    """DETR's cost [..., N, Q, K] of giving query q object k: -cls prob + L1 - GIoU
    (``logits`` [..., N, Q], ``boxes`` [..., N, Q, 4], ``gt`` [N, K, 4])."""
    pred, target = boxes[..., :, None, :], gt[..., None, :, :]
    l1 = (pred - target).abs().sum(-1)
    giou = generalized_iou(pred, target)
    return -weights.cls * logits.sigmoid()[..., None] + weights.l1 * l1 - weights.giou * giou


def _assign(cost: np.ndarray, count: int, copies: int) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's assignment of one prompt's [Q, K] costs to its first ``count`` objects."""
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    repeat = max(1, min(copies, cost.shape[0] // count))
    rows, cols = linear_sum_assignment(np.tile(cost[:, :count], (1, repeat)))
    return rows.astype(np.int64), (cols % count).astype(np.int64)


@torch.no_grad()
def hungarian_match(logits: torch.Tensor, boxes: torch.Tensor, targets: Targets | PaddedTargets,
                    weights: LossWeights, copies: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """(query indices, target indices) per prompt, for one decoder layer ([N, Q], [N, Q, 4]).

    With ``copies`` > 1 each object is matched to that many queries (fewer when the queries run out).
    """
    padded = _as_padded(targets)
    cost = matching_costs(logits.float(), boxes.float(), padded.boxes.to(boxes.device), weights).cpu().numpy()
    counts = padded.counts.tolist()
    return [_assign(cost[n], counts[n], copies) for n in range(len(counts))]


@torch.no_grad()
def match_all_layers(logits: torch.Tensor, boxes: torch.Tensor, targets: PaddedTargets, weights: LossWeights,
                     aux_copies: int) -> torch.Tensor:
    """Matches of every layer as one index tensor [4, M]: (layer, prompt, query, object).

    One host copy of the step's costs; the last layer matches one-to-one, the others with
    ``aux_copies`` queries per object.
    """
    layers = logits.shape[0]
    cost = matching_costs(logits.float(), boxes.float(), targets.boxes, weights).cpu().numpy()
    counts = targets.counts.tolist()
    columns = []
    for layer in range(layers):
        copies = 1 if layer == layers - 1 else aux_copies
        for n, count in enumerate(counts):
            rows, cols = _assign(cost[layer, n], count, copies)
            columns.append(np.stack([np.full_like(rows, layer), np.full_like(rows, n), rows, cols]))
    index = np.concatenate(columns, axis=1) if columns else np.zeros((4, 0), dtype=np.int64)
    return torch.from_numpy(index).to(logits.device)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = logits.sigmoid().flatten(1)
    target = target.flatten(1)
    numerator = 2 * (prob * target).sum(1)
    denominator = prob.sum(1) + target.sum(1)
    return 1 - (numerator + 1) / (denominator + 1)


def detection_loss(out: TrainOutputs, targets: Targets | PaddedTargets,
                   weights: LossWeights = LossWeights()) -> dict[str, torch.Tensor]:
    """Weighted losses (``total`` is what backpropagates) averaged over layers / objects."""
    padded = _as_padded(targets)
    layers = out.logits.shape[0]
    logits, boxes = out.logits.float(), out.boxes.float()
    counts = padded.counts
    num_objects = counts.sum().clamp(min=1).float()
    present = (counts > 0).float()
    layer, prompt, query, target = match_all_layers(logits, boxes, padded, weights, weights.aux_copies)
    zero = logits.new_zeros(())

    # Sum over queries, normalised by objects (DETR): absent prompts still teach "no".
    cls_target = torch.zeros_like(logits)
    cls_target[layer, prompt, query] = 1.0
    cls_terms = F.binary_cross_entropy_with_logits(logits, cls_target, reduction="none")
    if weights.presence_gated_cls:
        cls_terms = cls_terms * present[None, :, None]
    cls = cls_terms.sum() / num_objects
    pred, gt = boxes[layer, prompt, query], padded.boxes[prompt, target]
    l1 = F.l1_loss(pred, gt, reduction="sum") / num_objects if pred.numel() else zero
    giou = (1 - generalized_iou(pred, gt)).sum() / num_objects if pred.numel() else zero
    # Per layer the mean over prompts, then the mean over layers: one mean over both.
    presence = F.binary_cross_entropy_with_logits(out.presence.float().reshape(layers, -1),
                                                  present.expand(layers, -1))

    last = layer == layers - 1
    mask_bce = dice = zero
    if bool(last.any()):
        pred_masks = out.masks.float()[prompt[last], query[last]]
        gt_masks = padded.masks[prompt[last], target[last]]
        mask_bce = F.binary_cross_entropy_with_logits(pred_masks, gt_masks, reduction="none").flatten(1).mean(1).sum() / num_objects
        dice = dice_loss(pred_masks, gt_masks).sum() / num_objects
    semantic = out.semantic.float()[:, 0]
    valid = padded.valid[:, :, None, None]
    semantic_target = (padded.masks * valid).amax(1) if padded.masks.numel() else torch.zeros_like(semantic)
    semantic_bce = F.binary_cross_entropy_with_logits(semantic, semantic_target)
    present_rows = counts > 0
    semantic_dice = dice_loss(semantic[present_rows], semantic_target[present_rows]).mean() if bool(present_rows.any()) else zero
    terms = {"cls": cls / layers, "l1": l1 / layers, "giou": giou / layers, "presence": presence,
             "mask_bce": mask_bce, "dice": dice, "semantic_bce": semantic_bce, "semantic_dice": semantic_dice}
    total = sum(getattr(weights, key) * value for key, value in terms.items())
    return {"total": total, **terms}
