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
                      attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' full forward with Meta's semantics (one padding box -> CLS token only).

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
        input_boxes=torch.zeros(batch, 1, 4, dtype=pixel_values.dtype),
        input_boxes_labels=torch.full((batch, 1), -10, dtype=torch.long),
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
        model = self.model
        batch = text_features.shape[0]
        features = [level.expand(batch, -1, -1, -1) for level in levels]
        position = self.position.expand(batch, -1, -1, -1)
        prompt = torch.cat([text_features, geometry_cls.expand(batch, -1, -1)], dim=1)
        prompt_mask = torch.cat(
            [text_mask.bool(), torch.ones(batch, 1, dtype=torch.bool, device=text_mask.device)], dim=1
        )

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


PART_WRAPPERS: dict[str, type[nn.Module]] = {
    "image_encoder": ImageEncoder,
    "text_encoder": TextEncoder,
    "decoder": Decoder,
}


def split_model(model: Sam3Model) -> dict[str, nn.Module]:
    """The three graphs, sharing the model's weights (no copies)."""
    model.eval()
    return {name: wrapper(model).eval() for name, wrapper in PART_WRAPPERS.items()}
