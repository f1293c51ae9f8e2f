"""Meta's SAM3 state-dict keys <-> transformers' ``Sam3Model`` keys, both directions.

An explicit rule table (prefix renames, ``{n}`` for a layer index) plus the few tensors whose
layout differs: Meta fuses q/k/v (``qkv``/``in_proj_*``), keeps a CLS row in ``pos_embed`` and
stores ``text_projection`` transposed. Strict: a key no rule maps is a :class:`CheckpointError`
naming it. ``export/checkpoints.py`` uses it to load Meta checkpoints, ``export/lora.py`` to
merge adapters trained on Meta's module names.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from export.errors import CheckpointError, short_list


@dataclass(frozen=True)
class _Rule:
    """Prefix rename; ``{n}`` stands for a layer index (kept as is in both directions)."""

    meta: str
    hf: str

    def apply(self, key: str, to_hf: bool) -> str | None:
        src, dst = (self.meta, self.hf) if to_hf else (self.hf, self.meta)
        m = _rule_regex(src).match(key)
        if m is None:
            return None
        if "{n}" in dst:
            dst = dst.replace("{n}", m.group("n"))
        return dst + key[m.end():]


@functools.lru_cache(maxsize=None)
def _rule_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{n\}", r"(?P<n>\d+)"))


def _attn(meta: str, hf: str, out: str = "o_proj") -> list[_Rule]:
    """An attention module: its (split) q/k/v and its output projection."""
    return [_Rule(meta + "out_proj.", hf + out + "."), _Rule(meta, hf)]


def _mlp(meta: str, hf: str, n_layers: int) -> list[_Rule]:
    """Meta's ``MLP.layers.i`` -> transformers' ``layer{i+1}``."""
    return [_Rule(f"{meta}layers.{i}.", f"{hf}layer{i + 1}.") for i in range(n_layers)]


def _build_rules() -> list[_Rule]:
    vit, hvit = "backbone.vision_backbone.trunk.", "vision_encoder.backbone."
    neck, hneck = "backbone.vision_backbone.convs.{n}.", "vision_encoder.neck.fpn_layers.{n}."
    txt, htxt = "backbone.language_backbone.encoder.", "text_encoder."
    blk, hblk = txt + "transformer.resblocks.{n}.", htxt + "text_model.encoder.layers.{n}."
    geo, hgeo = "geometry_encoder.encode.{n}.", "geometry_encoder.layers.{n}."
    enc, henc = "transformer.encoder.layers.{n}.", "detr_encoder.layers.{n}."
    dec, hdec = "transformer.decoder.", "detr_decoder."
    dl, hdl = dec + "layers.{n}.", hdec + "layers.{n}."
    seg, hseg = "segmentation_head.", "mask_decoder."
    rules = [
        # ViT backbone
        _Rule(vit + "pos_embed", hvit + "embeddings.position_embeddings"),
        _Rule(vit + "patch_embed.proj.", hvit + "embeddings.patch_embeddings.projection."),
        _Rule(vit + "ln_pre.", hvit + "layer_norm."),
        _Rule(vit + "blocks.{n}.norm1.", hvit + "layers.{n}.layer_norm1."),
        _Rule(vit + "blocks.{n}.norm2.", hvit + "layers.{n}.layer_norm2."),
        _Rule(vit + "blocks.{n}.mlp.", hvit + "layers.{n}.mlp."),
        _Rule(vit + "blocks.{n}.attn.proj.", hvit + "layers.{n}.attention.o_proj."),
        _Rule(vit + "blocks.{n}.attn.", hvit + "layers.{n}.attention."),
        # FPN neck, scale factors [4, 2, 1, 0.5] (fixed in both implementations): level 0 is
        # ConvT, GELU, ConvT (indices 0 and 2), level 1 one ConvT, level 3 a maxpool (no weights)
        _Rule(neck.replace("{n}", "0") + "dconv_2x2_0.", hneck.replace("{n}", "0") + "scale_layers.0."),
        _Rule(neck.replace("{n}", "0") + "dconv_2x2_1.", hneck.replace("{n}", "0") + "scale_layers.2."),
        _Rule(neck.replace("{n}", "1") + "dconv_2x2.", hneck.replace("{n}", "1") + "scale_layers.0."),
        _Rule(neck + "conv_1x1.", hneck + "proj1."),
        _Rule(neck + "conv_3x3.", hneck + "proj2."),
        # CLIP text encoder
        _Rule(txt + "token_embedding.", htxt + "text_model.embeddings.token_embedding."),
        _Rule(txt + "positional_embedding", htxt + "text_model.embeddings.position_embedding.weight"),
        _Rule(txt + "ln_final.", htxt + "text_model.final_layer_norm."),
        _Rule(txt + "text_projection", htxt + "text_projection.weight"),
        _Rule(blk + "ln_1.", hblk + "layer_norm1."),
        _Rule(blk + "ln_2.", hblk + "layer_norm2."),
        _Rule(blk + "mlp.c_fc.", hblk + "mlp.fc1."),
        _Rule(blk + "mlp.c_proj.", hblk + "mlp.fc2."),
        *_attn(blk + "attn.", hblk + "self_attn.", out="out_proj"),
        _Rule("backbone.language_backbone.resizer.", "text_projection."),
        # geometry encoder
        *_attn(geo + "cross_attn_image.", hgeo + "cross_attn."),
        *_attn(geo + "self_attn.", hgeo + "self_attn."),
        _Rule(geo + "linear1.", hgeo + "mlp.fc1."),
        _Rule(geo + "linear2.", hgeo + "mlp.fc2."),
        _Rule(geo + "norm1.", hgeo + "layer_norm1."),
        _Rule(geo + "norm2.", hgeo + "layer_norm2."),
        _Rule(geo + "norm3.", hgeo + "layer_norm3."),
        _Rule("geometry_encoder.img_pre_norm.", "geometry_encoder.vision_layer_norm."),
        _Rule("geometry_encoder.norm.", "geometry_encoder.prompt_layer_norm."),
        _Rule("geometry_encoder.encode_norm.", "geometry_encoder.output_layer_norm."),
        *[
            _Rule(f"geometry_encoder.{name}.", f"geometry_encoder.{name}.")
            for name in ("boxes_direct_project", "boxes_pool_project", "boxes_pos_enc_project",
                         "cls_embed", "final_proj", "label_embed")
        ],
        # DETR encoder
        *_attn(enc + "cross_attn_image.", henc + "cross_attn."),
        *_attn(enc + "self_attn.", henc + "self_attn."),
        _Rule(enc + "linear1.", henc + "mlp.fc1."),
        _Rule(enc + "linear2.", henc + "mlp.fc2."),
        _Rule(enc + "norm1.", henc + "layer_norm1."),
        _Rule(enc + "norm2.", henc + "layer_norm2."),
        _Rule(enc + "norm3.", henc + "layer_norm3."),
        # DETR decoder
        *[_Rule(dec + f"{n}.", hdec + f"{n}.")
          for n in ("query_embed", "reference_points", "presence_token")],
        _Rule(dec + "presence_token_out_norm.", hdec + "presence_layer_norm."),
        _Rule(dec + "norm.", hdec + "output_layer_norm."),
        *_mlp(dec + "presence_token_head.", hdec + "presence_head.", 3),
        *_mlp(dec + "bbox_embed.", hdec + "box_head.", 3),
        *_mlp(dec + "ref_point_head.", hdec + "ref_point_head.", 2),
        *_mlp(dec + "boxRPB_embed_x.", hdec + "box_rpb_embed_x.", 2),
        *_mlp(dec + "boxRPB_embed_y.", hdec + "box_rpb_embed_y.", 2),
        *_attn(dl + "self_attn.", hdl + "self_attn."),
        *_attn(dl + "ca_text.", hdl + "text_cross_attn."),
        *_attn(dl + "cross_attn.", hdl + "vision_cross_attn."),
        _Rule(dl + "linear1.", hdl + "mlp.fc1."),
        _Rule(dl + "linear2.", hdl + "mlp.fc2."),
        _Rule(dl + "norm1.", hdl + "vision_cross_attn_layer_norm."),
        _Rule(dl + "catext_norm.", hdl + "text_cross_attn_layer_norm."),
        _Rule(dl + "norm2.", hdl + "self_attn_layer_norm."),
        _Rule(dl + "norm3.", hdl + "mlp_layer_norm."),
        # dot-product scoring
        *_mlp("dot_prod_scoring.prompt_mlp.", "dot_product_scoring.text_mlp.", 2),
        _Rule("dot_prod_scoring.prompt_mlp.out_norm.", "dot_product_scoring.text_mlp_out_norm."),
        _Rule("dot_prod_scoring.prompt_proj.", "dot_product_scoring.text_proj."),
        _Rule("dot_prod_scoring.hs_proj.", "dot_product_scoring.query_proj."),
        # mask decoder
        _Rule(seg + "pixel_decoder.", hseg + "pixel_decoder."),
        _Rule(seg + "mask_predictor.mask_embed.", hseg + "mask_embedder."),
        _Rule(seg + "instance_seg_head.", hseg + "instance_projection."),
        _Rule(seg + "semantic_seg_head.", hseg + "semantic_projection."),
        *_attn(seg + "cross_attend_prompt.", hseg + "prompt_cross_attn."),
        _Rule(seg + "cross_attn_norm.", hseg + "prompt_cross_attn_norm."),
    ]
    return rules


_RULES = _build_rules()
# most specific first, separately per direction (a longer source prefix wins)
_RULES_TO_HF = sorted(_RULES, key=lambda r: len(r.meta), reverse=True)
_RULES_TO_META = sorted(_RULES, key=lambda r: len(r.hf), reverse=True)

# Meta tensors with no transformers counterpart (measured on Meta's full build_sam3_image_model:
# 32 x attn.freqs_cis, 6 x geometry_encoder.points_* -- the image model never encodes points).
_META_DROPPED = re.compile(
    r"^backbone\.vision_backbone\.trunk\.blocks\.\d+\.attn\.freqs_cis$"
    r"|^geometry_encoder\.points_(direct_project|pool_project|pos_enc_project)\."
)
_FUSED = re.compile(r"^(?P<prefix>.*\.)(?:qkv\.(?P<w1>weight|bias)|in_proj_(?P<w2>weight|bias))$")
_SPLIT = re.compile(r"^(?P<prefix>.*\.)(?P<which>[qkv])_proj\.(?P<w>weight|bias)$")
_POS_EMBED = "backbone.vision_backbone.trunk.pos_embed"
_TEXT_PROJ = "backbone.language_backbone.encoder.text_projection"


def _rename(key: str, to_hf: bool) -> str | None:
    for rule in _RULES_TO_HF if to_hf else _RULES_TO_META:
        out = rule.apply(key, to_hf)
        if out is not None:
            return out
    return None


def meta_to_hf_state_dict(meta_sd: Mapping[str, Tensor], config: Any = None) -> dict[str, Tensor]:
    """Rename a Meta SAM3 image-model state dict (no ``detector.`` prefix) to transformers keys.

    Fused ``qkv``/``in_proj_*`` are split into q/k/v, ``pos_embed`` loses its CLS row,
    ``text_projection`` is transposed (Meta stores [width, out]; nn.Linear wants [out, width]),
    ``freqs_cis`` and the unused ``points_*`` weights are dropped. ``config`` is accepted for
    symmetry with :func:`hf_to_meta_state_dict`; the map itself needs no dims.
    Raises CheckpointError listing keys that match no rule.
    """
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in meta_sd.items():
        if _META_DROPPED.match(key):
            continue
        if key == _POS_EMBED:
            value = value[:, 1:, :]  # Meta keeps a CLS position (pretrain_use_cls_token); unused
        elif key == _TEXT_PROJ:
            value = value.t()
        fused = _FUSED.match(key)
        if fused:
            w = fused.group("w1") or fused.group("w2")
            parts = dict(zip("qkv", value.chunk(3, dim=0)))
            items = [(f"{fused.group('prefix')}{c}_proj.{w}", parts[c]) for c in "qkv"]
        else:
            items = [(key, value)]
        for meta_key, tensor in items:
            hf_key = _rename(meta_key, to_hf=True)
            if hf_key is None:
                unmatched.append(key)
                break
            out[hf_key] = tensor.contiguous()
    if unmatched:
        raise CheckpointError(
            f"{len(unmatched)} Meta checkpoint key(s) match no SAM3 parameter: {short_list(unmatched)}"
        )
    return out


def hf_to_meta_state_dict(hf_sd: Mapping[str, Tensor], config: Any = None) -> dict[str, Tensor]:
    """Inverse of :func:`meta_to_hf_state_dict` (trainer layout: no ``detector.`` prefix).

    What Meta stores but transformers does not (``freqs_cis``, ``points_*``) is not produced;
    the CLS row of ``pos_embed`` is restored as zeros (it never reaches the output).
    """
    split: dict[str, dict[str, Tensor]] = {}
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in hf_sd.items():
        meta_key = _rename(key, to_hf=False)
        if meta_key is None:
            unmatched.append(key)
            continue
        m = _SPLIT.match(meta_key)
        if m:  # Meta stores no separate q/k/v projections (measured: 0 of 1134 full-model keys)
            base = f"{m.group('prefix')}|{m.group('w')}"
            split.setdefault(base, {})[m.group("which")] = value
            continue
        if meta_key == _POS_EMBED:
            value = torch.cat([value.new_zeros(value.shape[0], 1, value.shape[2]), value], dim=1)
        elif meta_key == _TEXT_PROJ:
            value = value.t()
        out[meta_key] = value.contiguous()
    for base, parts in split.items():
        prefix, w = base.split("|")
        if set(parts) != {"q", "k", "v"}:
            unmatched.append(f"{prefix}{{q,k,v}}_proj.{w} (incomplete: {sorted(parts)})")
            continue
        fused_name = f"qkv.{w}" if prefix.startswith("backbone.vision_backbone.trunk.") else f"in_proj_{w}"
        out[prefix + fused_name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmatched:
        raise CheckpointError(
            f"{len(unmatched)} transformers key(s) have no Meta counterpart: {short_list(unmatched)}"
        )
    return out
