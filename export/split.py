"""The three graphs the edge runtime runs, as thin wrappers around transformers' ``Sam3Model``.

Reference semantics are Meta's: a text-only prompt is always followed by the geometry
encoder's CLS token (Meta's processor passes an empty geometric prompt). transformers'
``Sam3Model`` skips the geometry encoder when ``input_boxes`` is None, which changes the
answer (measured at full size: presence logit 0.23 vs -0.35, mask IoU 0.85-0.91); given one
padding box (label -10) it matches Meta to ~1e-4. With no valid box the CLS token depends
only on the image (roi_align contributes nothing), so :class:`ImageEncoder` computes it
once per image and the runtime caches it with the embedding: no ``RoiAlign`` in any graph.

The decoder takes the image tensors with batch 1 and the prompts with batch N and broadcasts
the image inside the graph, so N prompts on one image are one call without N copies of the
(large) image features on the host.

The FPN levels are the ones ``Sam3Model.forward`` uses (every level but the last): ``fpn_0`` ..
``fpn_2`` (4x, 2x, 1x the ViT grid) for SAM3's scale factors, as many as the config makes
otherwise (export/model_config.py derives them; the runtime feeds the decoder by name).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam3.modeling_sam3 import (
    Sam3Model,
    Sam3VisionEncoderOutput,
    box_cxcywh_to_xyxy,
    inverse_sigmoid,
)

from engines.bundle import TensorNames as T
from export.model_config import fpn_names, kept_fpn_sizes


def reference_forward(model: Sam3Model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, input_boxes: torch.Tensor | None = None,
                      input_boxes_labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """transformers' full forward with Meta's semantics (one padding box -> CLS token only).

    ``input_boxes`` [B,K,4] normalised cxcywh and ``input_boxes_labels`` [B,K] (1 positive,
    0 negative, -10 padding) are transformers' exemplar inputs; without them the prompt gets
    one padding box, so the geometry encoder still contributes its CLS token as in Meta's model.

    The PyTorch reference every exported graph is checked against. N prompts on one image run
    the vision encoder once and share its output (as Meta's processor does): expanding the
    pixels to batch N instead would cost N encoder passes and, at full size, ~7 GB per global
    attention matrix per extra prompt.
    """
    batch = input_ids.shape[0]
    vision = model.get_vision_features(pixel_values)
    if vision.fpn_hidden_states[0].shape[0] != batch:
        vision = Sam3VisionEncoderOutput(
            fpn_hidden_states=tuple(t.expand(batch, -1, -1, -1) for t in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(t.expand(batch, -1, -1, -1) for t in vision.fpn_position_encoding),
        )
    out = model(
        vision_embeds=vision,
        input_ids=input_ids.long(),
        attention_mask=attention_mask.long(),
        input_boxes=torch.zeros(batch, 1, 4, dtype=pixel_values.dtype) if input_boxes is None else input_boxes,
        input_boxes_labels=(torch.full((batch, 1), -10, dtype=torch.long) if input_boxes_labels is None
                            else input_boxes_labels.long()),
    )
    return {
        T.PRED_MASKS: out.pred_masks,
        T.PRED_BOXES: out.pred_boxes,
        T.PRED_LOGITS: out.pred_logits,
        T.PRESENCE_LOGITS: out.presence_logits,
    }


def geometry_cls_token(model: Sam3Model, features: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Geometry-encoder output for a prompt holding only the CLS token (no valid boxes).

    Equals ``Sam3GeometryEncoder.forward`` with one padding box: the padded box is masked
    out of self-attention, so only CLS survives, and nothing depends on roi_align.
    """
    geometry = model.geometry_encoder
    batch = features.shape[0]
    vision_flat = features.flatten(2).transpose(1, 2)
    position_flat = position.flatten(2).transpose(1, 2)
    cls = geometry.cls_embed.weight.view(1, 1, -1).expand(batch, -1, -1)
    hidden = geometry.prompt_layer_norm(geometry.final_proj(cls))
    for layer in geometry.layers:
        hidden = layer(prompt_feats=hidden, vision_feats=vision_flat, vision_pos_encoding=position_flat,
                       prompt_mask=None)
    return geometry.output_layer_norm(hidden)


def _level_position_encoding(model: Sam3Model) -> torch.Tensor:
    """Sine position encoding of the coarsest level used (1x for SAM3): a function of the shape only."""
    height, width = kept_fpn_sizes(model.config)[-1]
    shape = torch.Size([1, model.config.vision_config.fpn_hidden_size, height, width])
    dtype = next(model.parameters()).dtype  # fp16 for the FP16 range check's half copy
    return model.vision_encoder.neck.position_encoding(shape, "cpu", torch.float32).to(dtype)


class ImageEncoder(nn.Module):
    """pixel_values -> the FPN levels used (4x, 2x, 1x for SAM3; 0.5x pruned) + the geometry CLS token."""

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.model = model
        self.input_names = (T.PIXEL_VALUES,)
        self.output_names = (*fpn_names(model.config), T.GEOMETRY_CLS)
        self.register_buffer("position", _level_position_encoding(model), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vision = self.model.vision_encoder(pixel_values)
        levels = vision.fpn_hidden_states[:-1]  # Sam3Model.forward drops the last level
        position = self.position.expand(levels[-1].shape[0], -1, -1, -1)
        # The geometry encoder reads the coarsest level used (Sam3GeometryEncoder: img_feats[-1]).
        cls = geometry_cls_token(self.model, levels[-1], position)
        return (*levels, cls)


class TextEncoder(nn.Module):
    """CLIP text encoder + projection to the detector width: ids, mask -> text features."""

    input_names = (T.INPUT_IDS, T.ATTENTION_MASK)
    output_names = (T.TEXT_FEATURES,)

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        text = self.model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return self.model.text_projection(text.last_hidden_state)


class Decoder(nn.Module):
    """DETR encoder/decoder, scoring and mask head fed precomputed image and text features.

    Mirrors ``Sam3Model.forward`` after the encoders, with the prompt = text tokens then the
    geometry CLS token (mask = text mask, then 1).
    """

    output_names = (T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS, T.PRESENCE_LOGITS)

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.model = model
        self.input_names = (*fpn_names(model.config), T.GEOMETRY_CLS, T.TEXT_FEATURES, T.TEXT_MASK)
        self.register_buffer("position", _level_position_encoding(model), persistent=False)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(*fpn_levels, geometry_cls, text_features, text_mask)``, in ``input_names`` order."""
        *levels, geometry_cls, text_features, text_mask = inputs
        batch = text_features.shape[0]
        features = [level.expand(batch, -1, -1, -1) for level in levels]
        position = self.position.expand(batch, -1, -1, -1)
        prompt = torch.cat([text_features, geometry_cls.expand(batch, -1, -1)], dim=1)
        prompt_mask = torch.cat(
            [text_mask.bool(), torch.ones(batch, 1, dtype=torch.bool, device=text_mask.device)], dim=1
        )
        return self._decode(features, position, prompt, prompt_mask)

    def _decode(self, features: list[torch.Tensor], position: torch.Tensor, prompt: torch.Tensor,
                prompt_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything after the prompt is assembled (image tensors already expanded to B prompts).

        The text-only graph traces the same ops in the same order as before this method was
        split out, so its exported decoder is unchanged.
        """
        model = self.model

        encoder = model.detr_encoder(
            vision_features=[features[-1]],
            text_features=prompt,
            vision_pos_embeds=[position],
            text_mask=prompt_mask,
        )
        decoder = model.detr_decoder(
            vision_features=encoder.last_hidden_state,
            text_features=encoder.text_features,
            vision_pos_encoding=encoder.pos_embeds_flattened,
            text_mask=prompt_mask,
            spatial_shapes=encoder.spatial_shapes,
        )
        # Only the last decoder layer is read: slice before the heads so the earlier
        # layers' boxes/scores are never computed.
        last_hidden = decoder.intermediate_hidden_states[-1]
        box_offsets = model.detr_decoder.box_head(last_hidden)
        boxes = box_cxcywh_to_xyxy((inverse_sigmoid(decoder.reference_boxes[-1]) + box_offsets).sigmoid())
        logits = model.dot_product_scoring(
            decoder_hidden_states=last_hidden.unsqueeze(0),
            text_features=encoder.text_features,
            text_mask=prompt_mask,
        )[0].squeeze(-1)
        presence = decoder.presence_logits[-1]
        masks = model.mask_decoder(
            decoder_queries=last_hidden,
            backbone_features=features,
            encoder_hidden_states=encoder.last_hidden_state,
            prompt_features=prompt,
            prompt_mask=prompt_mask,
        ).pred_masks
        return masks, boxes, logits, presence


def roi_pool(features: torch.Tensor, boxes_xyxy: torch.Tensor, size: int) -> torch.Tensor:
    """``torchvision.ops.roi_align(features, boxes, size)`` (aligned=False, adaptive sampling) as
    two matrix products, for one image shared by every box.

    TensorRT's ONNX parser has no ``RoiAlign``; this uses MatMul, Ceil, Clamp and comparisons.
    roi_align's bilinear sample is separable (a tent weight in y times one in x, zero outside
    [-1, H] / [-1, W], clamped to the border inside), and its bin average is a mean over a
    grid of ``ceil(roi_h / size) x ceil(roi_w / size)`` samples, so each output bin is
    ``Wy[i] @ F @ Wx[j]`` with ``Wy`` [size, H] the bin's mean tent weights. The sample grid is
    data-dependent; it is evaluated at its largest size (a box spanning the feature map) with
    the samples past the box's own grid masked out. Boxes must lie within the feature map
    (the runtime clips them to the image), which bounds that size.

    ``features`` [1, C, H, W]; ``boxes_xyxy`` [B, K, 4] in feature pixels -> [B, K, C, size, size].
    """
    height, width = int(features.shape[-2]), int(features.shape[-1])  # static: constants in the graph

    def weights(start: torch.Tensor, end: torch.Tensor, extent: int) -> torch.Tensor:
        grid_max = -(-extent // size)  # ceil: the sample grid of a box spanning the map
        length = (end - start).clamp(min=1.0)  # aligned=False: rois are at least one pixel
        bin_size = length / size
        grid = torch.ceil(length / size)  # [B, K]
        bins = torch.arange(size, dtype=start.dtype, device=start.device)
        samples = torch.arange(grid_max, dtype=start.dtype, device=start.device)
        # [B, K, size, grid_max] sample coordinates, as roi_align computes them
        coords = (start[..., None, None] + bins[:, None] * bin_size[..., None, None]
                  + (samples + 0.5) * (bin_size / grid)[..., None, None])
        used = (samples < grid[..., None, None]) & (coords >= -1.0) & (coords <= float(extent))
        clamped = coords.clamp(0.0, float(extent - 1))
        pixels = torch.arange(extent, dtype=start.dtype, device=start.device)
        tent = (1.0 - (clamped[..., None] - pixels).abs()).clamp(min=0.0)  # [B, K, size, grid_max, extent]
        tent = tent * used[..., None].to(tent.dtype)
        return tent.sum(dim=-2) / grid[..., None, None]  # [B, K, size, extent]

    x0, y0, x1, y1 = boxes_xyxy.unbind(-1)
    wy = weights(y0, y1, height)
    wx = weights(x0, x1, width)
    rows = torch.matmul(wy.unsqueeze(2), features.unsqueeze(0))  # [B, K, C, size, W]
    return torch.matmul(rows, wx.unsqueeze(2).transpose(-1, -2))  # [B, K, C, size, size]


class GeometryEncoder(nn.Module):
    """Exemplar boxes + the cached 1x image level -> geometry prompt tokens (boxes, then CLS).

    ``Sam3GeometryEncoder.forward`` for B prompts of K boxes each on one image: inputs are
    transformers' (normalised cxcywh boxes; labels 1 positive, 0 negative, -10 padding), the
    ROI pooling is :func:`roi_pool`. Meta puts CLS right after the valid boxes and this graph
    puts it last, after the padding: no layer that reads the prompt (geometry self-attention,
    DETR encoder/decoder cross-attention, scoring's masked mean, mask-decoder cross-attention)
    has a position encoding on prompt tokens, so the order of masked tokens changes nothing.
    """

    output_names = (T.GEOMETRY_FEATURES, T.GEOMETRY_MASK)

    def __init__(self, model: Sam3Model) -> None:
        super().__init__()
        self.model = model
        self.input_names = (fpn_names(model.config)[-1], T.INPUT_BOXES, T.INPUT_BOXES_LABELS)
        self.register_buffer("position", _level_position_encoding(model), persistent=False)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        geometry = self.model.geometry_encoder
        batch, count = boxes.shape[:2]
        hidden = geometry.hidden_size
        height, width = int(features.shape[-2]), int(features.shape[-1])
        valid = labels != -10
        normalised = geometry.vision_layer_norm(features.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

        embed = geometry.boxes_direct_project(boxes)
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        pooled = roi_pool(normalised, box_cxcywh_to_xyxy(boxes) * scale, geometry.roi_size)
        pooled = geometry.boxes_pool_project(pooled.reshape(batch * count, hidden, geometry.roi_size,
                                                            geometry.roi_size))
        embed = embed + pooled.view(batch, count, hidden)
        cx, cy, w, h = boxes.reshape(batch * count, 4).unbind(-1)
        coordinates = geometry._encode_box_coordinates(cx, cy, w, h).view(batch, count, -1)
        embed = embed + geometry.boxes_pos_enc_project(coordinates)
        embed = embed + geometry.label_embed(torch.where(valid, labels, 0).long())

        cls = geometry.cls_embed.weight.view(1, 1, hidden).expand(batch, -1, -1)
        tokens = geometry.prompt_layer_norm(geometry.final_proj(torch.cat([embed, cls], dim=1)))
        mask = torch.cat([valid, torch.ones(batch, 1, dtype=torch.bool, device=valid.device)], dim=1)
        # Additive key mask, as transformers' eager/sdpa attention receives it.
        attention = torch.zeros(batch, 1, 1, count + 1, dtype=tokens.dtype, device=tokens.device)
        attention = attention.masked_fill(~mask[:, None, None, :], torch.finfo(tokens.dtype).min)
        vision = features.flatten(2).transpose(1, 2).expand(batch, -1, -1)
        position = self.position.flatten(2).transpose(1, 2).expand(batch, -1, -1)
        for layer in geometry.layers:
            tokens = layer(prompt_feats=tokens, vision_feats=vision, vision_pos_encoding=position,
                           prompt_mask=attention)
        return geometry.output_layer_norm(tokens), mask.to(torch.int32)


class ExemplarDecoder(Decoder):
    """:class:`Decoder` with a prompt of text tokens then geometry tokens (boxes + CLS) and their masks.

    Text-only requests keep using :class:`Decoder` and its cached CLS token.
    """

    def __init__(self, model: Sam3Model) -> None:
        super().__init__(model)
        self.input_names = (*fpn_names(model.config), T.TEXT_FEATURES, T.TEXT_MASK,
                            T.GEOMETRY_FEATURES, T.GEOMETRY_MASK)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(*fpn_levels, text_features, text_mask, geometry_features, geometry_mask)``."""
        *levels, text_features, text_mask, geometry_features, geometry_mask = inputs
        batch = text_features.shape[0]
        features = [level.expand(batch, -1, -1, -1) for level in levels]
        position = self.position.expand(batch, -1, -1, -1)
        prompt = torch.cat([text_features, geometry_features], dim=1)
        prompt_mask = torch.cat([text_mask.bool(), geometry_mask.bool()], dim=1)
        return self._decode(features, position, prompt, prompt_mask)


PART_WRAPPERS: dict[str, type[nn.Module]] = {
    "image_encoder": ImageEncoder,
    "text_encoder": TextEncoder,
    "decoder": Decoder,
}
# Graphs for exemplar (box) prompts; a bundle may lack them and still serves text.
EXEMPLAR_WRAPPERS: dict[str, type[nn.Module]] = {
    "geometry_encoder": GeometryEncoder,
    "exemplar_decoder": ExemplarDecoder,
}


def split_model(model: Sam3Model, exemplars: bool = False) -> dict[str, nn.Module]:
    """The three graphs (five with ``exemplars``), sharing the model's weights (no copies)."""
    model.eval()
    wrappers = {**PART_WRAPPERS, **(EXEMPLAR_WRAPPERS if exemplars else {})}
    return {name: wrapper(model).eval() for name, wrapper in wrappers.items()}
