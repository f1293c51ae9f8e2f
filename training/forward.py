"""The training forward: the exported graphs' semantics, with every decoder layer's outputs.

It computes exactly what ``export.split`` exports (Meta's semantics: text tokens followed by
the geometry encoder's CLS token), so what is trained is what is served; a test checks the
last layer against ``export.split.reference_forward``. The extra per-layer boxes, logits and
presence logits feed the auxiliary (deep supervision) losses DETR-style models need to
converge, and the mask decoder's semantic-segmentation map (not exported: SAM3 trains it as a
dense, text-conditioned signal that teaches the encoder to fuse prompt and image early).
Each image is encoded once and shared by its prompts (``image_index``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.models.sam3.modeling_sam3 import Sam3Model, box_cxcywh_to_xyxy, inverse_sigmoid

from export.split import geometry_cls_token


@dataclass
class TrainOutputs:
    logits: torch.Tensor  # [L, N, Q] per decoder layer
    boxes: torch.Tensor  # [L, N, Q, 4] normalised xyxy
    presence: torch.Tensor  # [L, N, 1]
    masks: torch.Tensor  # [N, Q, h, w] mask logits (last layer)
    semantic: torch.Tensor  # [N, 1, h, w] semantic-segmentation logits (training signal only)


def forward_train(model: Sam3Model, pixel_values: torch.Tensor, image_index: torch.Tensor,
                  input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  exemplar_boxes: torch.Tensor | None = None,
                  exemplar_labels: torch.Tensor | None = None) -> TrainOutputs:
    """``pixel_values`` [B, 3, S, S]; prompt n belongs to image ``image_index[n]``.

    ``exemplar_boxes`` [N, K, 4] (normalised cxcywh) with ``exemplar_labels`` [N, K] (1, 0, or
    -10 for none) run transformers' geometry encoder on the boxes, as the exemplar graphs do;
    without them every prompt gets the CLS token alone, as the text-only graphs do.
    """
    vision = model.vision_encoder(pixel_values)
    levels = list(vision.fpn_hidden_states[:3])
    position = vision.fpn_position_encoding[2]
    features = [level[image_index] for level in levels]
    text = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
    text_features = model.text_projection(text.last_hidden_state)
    if exemplar_boxes is None or exemplar_labels is None:
        cls = geometry_cls_token(model, levels[2], position)  # once per image, as the runtime caches it
        geometry, geometry_mask = cls[image_index], torch.ones_like(attention_mask[:, :1], dtype=torch.bool)
    else:
        valid = exemplar_labels != -10
        out = model.geometry_encoder(box_embeddings=exemplar_boxes, box_mask=valid,
                                     box_labels=torch.where(valid, exemplar_labels, 0),
                                     img_feats=(features[2],), img_pos_embeds=(position[image_index],))
        geometry, geometry_mask = out.last_hidden_state, out.attention_mask.bool()
    position = position[image_index]
    prompt = torch.cat([text_features, geometry], dim=1)
    prompt_mask = torch.cat([attention_mask.bool(), geometry_mask], dim=1)

    encoder = model.detr_encoder(vision_features=[features[-1]], text_features=prompt,
                                 vision_pos_embeds=[position], text_mask=prompt_mask)
    decoder = model.detr_decoder(vision_features=encoder.last_hidden_state, text_features=encoder.text_features,
                                 vision_pos_encoding=encoder.pos_embeds_flattened, text_mask=prompt_mask,
                                 spatial_shapes=encoder.spatial_shapes)
    hidden = decoder.intermediate_hidden_states  # [L, N, Q, C]
    offsets = model.detr_decoder.box_head(hidden)
    boxes = box_cxcywh_to_xyxy((inverse_sigmoid(decoder.reference_boxes) + offsets).sigmoid())
    logits = model.dot_product_scoring(decoder_hidden_states=hidden, text_features=encoder.text_features,
                                       text_mask=prompt_mask).squeeze(-1)
    mask_out = model.mask_decoder(decoder_queries=hidden[-1], backbone_features=features,
                                  encoder_hidden_states=encoder.last_hidden_state, prompt_features=prompt,
                                  prompt_mask=prompt_mask)
    return TrainOutputs(logits=logits, boxes=boxes, presence=decoder.presence_logits, masks=mask_out.pred_masks,
                        semantic=mask_out.semantic_seg)
