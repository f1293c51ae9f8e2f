"""Load SAM3 checkpoints (HF, Meta ``sam3.pt``, Meta trainer) into transformers' ``Sam3Model``.

Why transformers' model: it is the ONNX graph source (its ViT RoPE is real-valued; Meta's uses
complex tensors that ONNX cannot carry). Meta checkpoints are therefore renamed key by key into
the transformers layout here; the mapping is explicit (a rule table) and strict: any key that
matches no rule, or any parameter the model expects but the checkpoint lacks, is a
:class:`CheckpointError` naming them -- never ``strict=False``.

Weights tell most dims (widths, depths, MLP sizes, query count, ...). They do not tell the input
resolution, the global-attention layers or most attention-head counts; those come from a
``config.json`` beside the checkpoint, the ``config`` argument (a Sam3Config dict, a preset
name or a JSON path) or ``image_size``. Meta's ViT stores its RoPE table (``attn.freqs_cis``,
[window^2 or grid^2, head_dim/2]) per block, which -- when present -- also gives the ViT heads,
the window size and the global-attention layers; it is then dropped (transformers computes RoPE).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from engines.bundle import sha256_file

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds
    from transformers import Sam3Config, Sam3Model

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_PREFIX = "detector_model."  # Sam3Model.base_model_prefix; a sam3_video checkpoint nests it there
HF_IGNORED_PREFIXES = ("tracker_model.", "tracker_neck.")  # Sam3Model._keys_to_ignore_on_load_unexpected
META_PREFIX = "detector."
META_IGNORED_PREFIXES = ("tracker.",)
META_PROBE_KEY = "backbone.vision_backbone.trunk.patch_embed.proj.weight"


class CheckpointError(Exception):
    """A user-facing, one-line reason why a checkpoint cannot be loaded."""


@dataclass
class LoadedCheckpoint:
    model: "Sam3Model"  # eval mode, fp32, eager attention
    config: "Sam3Config"
    format: str  # "hf" | "meta" | "meta-trainer"
    source_name: str  # file or directory name
    sha256: str  # of the weights file (for a directory: of model.safetensors)


# ----------------------------------------------------------------------------------------------
# Key map Meta <-> transformers
# ----------------------------------------------------------------------------------------------
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


def _short_list(keys: Iterable[str], limit: int = 6) -> str:
    keys = sorted(keys)
    head = ", ".join(keys[:limit])
    return head + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


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
            f"{len(unmatched)} Meta checkpoint key(s) match no SAM3 parameter: {_short_list(unmatched)}"
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
            f"{len(unmatched)} transformers key(s) have no Meta counterpart: {_short_list(unmatched)}"
        )
    return out


# ----------------------------------------------------------------------------------------------
# Config: what the weights tell, what must come from a config
# ----------------------------------------------------------------------------------------------
def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"checkpoint lacks {key!r}: not a complete SAM3 image model")
    return tuple(sd[key].shape)


def _dims_from_meta(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Any]]:
    """Every dim the tensor shapes determine, as nested Sam3Config fields."""
    vit = "backbone.vision_backbone.trunk."
    txt = "backbone.language_backbone.encoder."
    width, _, patch, _ = _shape(sd, vit + "patch_embed.proj.weight")
    pos = _shape(sd, vit + "pos_embed")[1] - 1  # minus the CLS position
    pre_grid = math.isqrt(pos)
    if pre_grid * pre_grid != pos:
        raise CheckpointError(f"pos_embed has {pos + 1} rows: not a square grid plus a CLS row")
    vocab, twidth = _shape(sd, txt + "token_embedding.weight")
    d_geo = _shape(sd, "geometry_encoder.cls_embed.weight")[1]
    d_enc = _shape(sd, "transformer.encoder.layers.0.linear1.weight")[1]
    d_dec = _shape(sd, "transformer.decoder.query_embed.weight")[1]
    backbone = {
        "hidden_size": width,
        "patch_size": patch,
        "pretrain_image_size": pre_grid * patch,
        "num_hidden_layers": _count(sd, re.escape(vit) + r"blocks\.(\d+)\."),
        "intermediate_size": _shape(sd, vit + "blocks.0.mlp.fc1.weight")[0],
    }
    return {
        "backbone_config": backbone,
        "vision_config": {"fpn_hidden_size": _shape(sd, "backbone.vision_backbone.convs.0.conv_1x1.weight")[0]},
        "text_config": {
            "vocab_size": vocab,
            "hidden_size": twidth,
            "max_position_embeddings": _shape(sd, txt + "positional_embedding")[0],
            "num_hidden_layers": _count(sd, re.escape(txt) + r"transformer\.resblocks\.(\d+)\."),
            "intermediate_size": _shape(sd, txt + "transformer.resblocks.0.mlp.c_fc.weight")[0],
            "projection_dim": _shape(sd, txt + "text_projection")[1],
        },
        "geometry_encoder_config": {
            "hidden_size": d_geo,
            "num_layers": _count(sd, r"geometry_encoder\.encode\.(\d+)\."),
            "intermediate_size": _shape(sd, "geometry_encoder.encode.0.linear1.weight")[0],
        },
        "detr_encoder_config": {
            "hidden_size": d_enc,
            "num_layers": _count(sd, r"transformer\.encoder\.layers\.(\d+)\."),
            "intermediate_size": _shape(sd, "transformer.encoder.layers.0.linear1.weight")[0],
        },
        "detr_decoder_config": {
            "hidden_size": d_dec,
            "num_layers": _count(sd, r"transformer\.decoder\.layers\.(\d+)\."),
            "intermediate_size": _shape(sd, "transformer.decoder.layers.0.linear1.weight")[0],
            "num_queries": _shape(sd, "transformer.decoder.query_embed.weight")[0],
            # boxRPB MLP outputs one bias per attention head
            "num_attention_heads": _shape(sd, "transformer.decoder.boxRPB_embed_x.layers.1.weight")[0],
        },
        "mask_decoder_config": {"hidden_size": _shape(sd, "segmentation_head.cross_attn_norm.weight")[0]},
    }


@dataclass(frozen=True)
class _RopeFacts:
    """What Meta's per-block ``freqs_cis`` ([tokens, head_dim/2]) reveals, if saved."""

    heads: int
    window_size: int | None
    global_attn_indexes: list[int] | None
    grid: int | None


def _rope_facts(sd: Mapping[str, Tensor], width: int, depth: int) -> _RopeFacts | None:
    keys = [f"backbone.vision_backbone.trunk.blocks.{i}.attn.freqs_cis" for i in range(depth)]
    if not all(k in sd for k in keys):
        return None
    tokens = [int(sd[k].shape[0]) for k in keys]
    head_dim = 2 * int(sd[keys[0]].shape[1])
    heads = width // head_dim
    sizes = sorted(set(tokens))
    if len(sizes) != 2:  # all blocks alike: windowed vs global cannot be told apart
        return _RopeFacts(heads, None, None, None)
    window, grid = (math.isqrt(s) for s in sizes)
    return _RopeFacts(heads, window, [i for i, t in enumerate(tokens) if t == sizes[1]], grid)


# fields the weights cannot tell: (config section, field) -> why it matters
_UNINFERABLE = [
    ("backbone_config", "num_attention_heads"),
    ("backbone_config", "window_size"),
    ("backbone_config", "global_attn_indexes"),
    ("text_config", "num_attention_heads"),
    ("geometry_encoder_config", "num_attention_heads"),
    ("detr_encoder_config", "num_attention_heads"),
    ("mask_decoder_config", "num_attention_heads"),
]


def _section(d: dict[str, Any], name: str) -> dict[str, Any]:
    if name == "backbone_config":
        return d.setdefault("vision_config", {}).setdefault("backbone_config", {})
    return d.setdefault(name, {})


def _defaults() -> dict[str, Any]:
    from transformers import Sam3Config

    return Sam3Config().to_dict()


def _feature_sizes(grid: int) -> list[list[int]]:
    """FPN sizes of the three levels transformers keeps: 4x, 2x, 1x the ViT grid."""
    return [[4 * grid, 4 * grid], [2 * grid, 2 * grid], [grid, grid]]


def _resolve_image_size(
    image_size: int | None, base: dict[str, Any], patch: int, rope: _RopeFacts | None
) -> int | None:
    """``image_size`` arg > the config's image_size > Meta's global RoPE grid; checked.

    A config's ``backbone_feature_sizes`` must agree with its own image_size; when the config
    states feature sizes but no image_size, they pin the resolution and a different
    ``image_size`` is an error. An explicit ``image_size`` otherwise overrides the config.
    """
    given_vision = base.get("vision_config", {})
    cfg_size = given_vision.get("backbone_config", {}).get("image_size")
    sizes = given_vision.get("backbone_feature_sizes")
    sizes = None if sizes is None else [list(s) for s in sizes]
    if cfg_size is not None and sizes is not None and sizes != _feature_sizes(cfg_size // patch):
        raise CheckpointError(
            f"config is inconsistent: image_size {cfg_size} needs backbone_feature_sizes "
            f"{_feature_sizes(cfg_size // patch)}, it has {sizes}"
        )
    size = image_size if image_size is not None else cfg_size
    if size is None and rope is not None and rope.grid is not None:
        size = rope.grid * patch
    if size is None and sizes is not None:
        size = sizes[-1][0] * patch
    if size is None:
        return None
    if size <= 0 or size % patch:
        raise CheckpointError(f"image size {size} is not a positive multiple of the patch size {patch}")
    if cfg_size is None and sizes is not None and sizes != _feature_sizes(size // patch):
        raise CheckpointError(
            f"image size {size} (grid {size // patch}) is inconsistent with the config's "
            f"backbone_feature_sizes {sizes} (expected {_feature_sizes(size // patch)})"
        )
    return size


def infer_config_from_meta(
    meta_sd: Mapping[str, Tensor], *, image_size: int | None = None, base: dict | None = None
) -> "Sam3Config":
    """A ``Sam3Config`` whose dims come from tensor shapes, the rest from ``base``.

    ``base`` is a Sam3Config dict (config.json / preset). A value it states explicitly that
    contradicts the weights is an error. Fields the weights cannot tell (attention heads, window,
    global layers, resolution) come from ``base``; if absent they fall back to SAM3's published
    defaults only where those fit the inferred dims (e.g. 16 text heads for a 1024-wide text
    encoder), else this raises CheckpointError saying what to provide.
    """
    from transformers import Sam3Config

    base = copy.deepcopy(base or {})
    base.pop("model_type", None)
    base.pop("_comment", None)
    dims = _dims_from_meta(meta_sd)
    bb = dims["backbone_config"]
    rope = _rope_facts(meta_sd, bb["hidden_size"], bb["num_hidden_layers"])
    if rope is not None:
        bb["num_attention_heads"] = rope.heads
        if rope.window_size is not None:
            bb["window_size"] = rope.window_size
            bb["global_attn_indexes"] = rope.global_attn_indexes

    merged = copy.deepcopy(base)
    for section, fields in dims.items():
        given = _section(base, section)
        target = _section(merged, section)
        for name, value in fields.items():
            if name in given and given[name] != value:
                where = f"{section}.{name}"
                raise CheckpointError(f"config says {where}={given[name]!r} but the checkpoint has {value!r}")
            target[name] = value

    defaults = _defaults()
    default_width = {
        "backbone_config": defaults["vision_config"]["backbone_config"]["hidden_size"],
        "text_config": defaults["text_config"]["hidden_size"],
    }
    missing = []
    for section, name in _UNINFERABLE:
        target = _section(merged, section)
        if name in target:
            continue
        default_section = _section(copy.deepcopy(defaults), section)
        width_ok = target["hidden_size"] == (default_width.get(section) or default_section["hidden_size"])
        depth_ok = section != "backbone_config" or target["num_hidden_layers"] == default_section["num_hidden_layers"]
        if width_ok and depth_ok:
            target[name] = default_section[name]
        else:
            missing.append(f"{section}.{name}")
    if missing:
        raise CheckpointError(
            "the weights do not tell " + ", ".join(missing) + " for these non-default dims: "
            "put a config.json (Sam3Config dict or preset name) beside the checkpoint or pass --config"
        )

    patch = bb["patch_size"]
    size = _resolve_image_size(image_size, base, patch, rope)
    if size is None:
        if bb["hidden_size"] != default_width["backbone_config"]:
            raise CheckpointError(
                "the input resolution cannot be read from these weights: pass --image-size or a config.json"
            )
        size = defaults["vision_config"]["backbone_config"]["image_size"]
    _section(merged, "backbone_config")["image_size"] = size
    merged["vision_config"]["backbone_feature_sizes"] = _feature_sizes(size // patch)
    return _make_config(merged)


def _make_config(data: dict[str, Any]) -> "Sam3Config":
    from transformers import Sam3Config

    data = copy.deepcopy(data)
    for key in ("model_type", "_comment", "transformers_version", "architectures"):
        data.pop(key, None)
    # sub-config dicts need their model_type to be built (AutoConfig dispatch)
    if isinstance(data.get("vision_config"), dict) and isinstance(data["vision_config"].get("backbone_config"), dict):
        data["vision_config"]["backbone_config"].setdefault("model_type", "sam3_vit_model")
    if isinstance(data.get("text_config"), dict):
        data["text_config"].setdefault("model_type", "clip_text_model")
        # SAM3's text tower uses exact GELU (Meta: nn.GELU; Sam3Config's text defaults), while a
        # bare CLIPTextConfig would default to quick_gelu
        data["text_config"].setdefault("hidden_act", "gelu")
    try:
        config = Sam3Config(**data)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"invalid SAM3 config: {exc}".splitlines()[0]) from exc
    config._attn_implementation = "eager"
    return config


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
def _config_dict(config: str | Path | dict | None, beside: Path | None) -> dict[str, Any] | None:
    """``config`` (dict / preset name / JSON path) or else ``config.json`` in ``beside``."""
    from export.presets import preset_dict, preset_names

    if isinstance(config, dict):
        return copy.deepcopy(config)
    if config is not None:
        text = str(config)
        if text in preset_names():
            return preset_dict(text)
        path = Path(text)
        if not path.is_file():
            raise CheckpointError(f"config {text!r} is neither a file nor a preset ({', '.join(preset_names())})")
        return _read_json_config(path)
    if beside is not None and (beside / HF_CONFIG).is_file():
        return _read_json_config(beside / HF_CONFIG)
    return None


def _read_json_config(path: Path) -> dict[str, Any]:
    """A Sam3Config dict; also accepts a preset name as a JSON string, or a sam3_video config."""
    from export.presets import preset_dict

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path.name}: {exc}".splitlines()[0]) from exc
    if isinstance(data, str):
        try:
            return preset_dict(data)
        except ValueError as exc:
            raise CheckpointError(f"{path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path.name} is not a JSON object")
    if isinstance(data.get("detector_config"), dict):  # sam3_video checkpoint (facebook/sam3)
        data = data["detector_config"]
    return data


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - zip and legacy pickles fail differently; retry without mmap
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a readable checkpoint"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path.name} as a PyTorch checkpoint: {reason[:200]}") from exc


def _unwrap_meta(obj: Any, name: str) -> tuple[dict[str, Tensor], str]:
    """Meta ``sam3.pt`` (``detector.`` keys, optional ``model`` wrapper) or trainer checkpoint."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, not a state dict")
    sd = obj.get("model", obj.get("state_dict", obj))
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{name} has no tensor state dict (top-level keys: {_short_list(map(str, obj))})")
    if any(k.startswith(META_PREFIX) for k in sd):
        others = [k for k in sd if not k.startswith(META_PREFIX) and not k.startswith(META_IGNORED_PREFIXES)]
        if others:
            raise CheckpointError(f"{name}: keys outside detector./tracker.: {_short_list(others)}")
        sd = {k[len(META_PREFIX):]: v for k, v in sd.items() if k.startswith(META_PREFIX)}
        fmt = "meta"
    else:
        fmt = "meta-trainer"
    if META_PROBE_KEY not in sd:
        if any(k.startswith(("vision_encoder.", HF_PREFIX)) for k in sd):
            raise CheckpointError(f"{name} holds transformers keys: save it as a directory with config.json + model.safetensors")
        raise CheckpointError(f"{name} is not a SAM3 checkpoint (no {META_PROBE_KEY})")
    return sd, fmt


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, header errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {path.name} as safetensors: {reason[:200]}") from exc


def _strip_hf_prefix(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys as ``Sam3Model.save_pretrained`` writes them, or nested under ``detector_model.``."""
    if not any(k.startswith(HF_PREFIX) for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        if key.startswith(HF_PREFIX):
            out[key[len(HF_PREFIX):]] = value
        elif not key.startswith(HF_IGNORED_PREFIXES):
            out[key] = value  # reported as unexpected by the strict load
    return out


# ----------------------------------------------------------------------------------------------
# Building the model
# ----------------------------------------------------------------------------------------------
def _build_model(config: "Sam3Config", state_dict: dict[str, Tensor]) -> "Sam3Model":
    """Strictly load ``state_dict`` into a fresh ``Sam3Model`` (fp32, eval, eager attention).

    Built under ``no_init_weights`` (parameters are ``torch.empty``: no init cost, no pages
    touched) and loaded with ``assign=True``, so peak RAM is ~ one copy of the weights.
    """
    from transformers import Sam3Model
    from transformers.initialization import no_init_weights

    config._attn_implementation = "eager"
    with no_init_weights():
        model = Sam3Model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short_list(unexpected)}")
        raise CheckpointError("checkpoint does not match the SAM3 model: " + "; ".join(parts))
    bad = [f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}" for k in expected
           if tuple(state_dict[k].shape) != expected[k]]
    if bad:
        raise CheckpointError(f"shape mismatch in {len(bad)} tensor(s) (checkpoint vs config): {_short_list(bad, 3)}")
    fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(fp32, strict=True, assign=True)
    return model.float().eval()


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def _apply_image_size(cfg: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """HF configs: ``image_size`` overrides the resolution; feature sizes follow (4x, 2x, 1x)."""
    cfg = copy.deepcopy(cfg)
    vision = cfg.setdefault("vision_config", {})
    backbone = vision.setdefault("backbone_config", {})
    patch = backbone.get("patch_size", 14)
    if image_size is None:
        size = backbone.get("image_size")
        if size is not None and vision.get("backbone_feature_sizes") is not None:
            _resolve_image_size(None, cfg, patch, None)  # consistency check only
        return cfg
    _resolve_image_size(image_size, cfg, patch, None)
    backbone["image_size"] = image_size
    vision["backbone_feature_sizes"] = _feature_sizes(image_size // patch)
    return cfg


def _unwrap_lora(sd: dict[str, Tensor], lora: Any) -> dict[str, Tensor]:
    """A fine-tuned state dict still holding LoRA wrappers: merge them into plain weights."""
    from export.lora import has_lora_wrappers, unwrap_lora_state_dict

    return unwrap_lora_state_dict(sd, lora) if has_lora_wrappers(sd) else sd


def _load_hf(weights: Path, image_size: int | None, config: str | Path | dict | None,
             lora: Any = None) -> LoadedCheckpoint:
    cfg = _config_dict(config, weights.parent)
    if cfg is None:
        raise CheckpointError(f"no {HF_CONFIG} beside {weights.name} and no --config given")
    cfg = _apply_image_size(cfg, image_size)
    sam3_config = _make_config(cfg)
    sd = _unwrap_lora(_strip_hf_prefix(_read_safetensors(weights)), lora)
    model = _build_model(sam3_config, sd)
    return LoadedCheckpoint(model, model.config, "hf", weights.parent.name if weights.name == HF_WEIGHTS else weights.name, sha256_file(weights))


def _load_meta(path: Path, image_size: int | None, config: str | Path | dict | None,
               lora: Any = None) -> LoadedCheckpoint:
    sd, fmt = _unwrap_meta(_torch_load(path), path.name)
    sd = _unwrap_lora(sd, lora)
    base = _config_dict(config, path.parent)
    sam3_config = infer_config_from_meta(sd, image_size=image_size, base=base)
    hf_sd = meta_to_hf_state_dict(sd, sam3_config)
    del sd
    model = _build_model(sam3_config, hf_sd)
    return LoadedCheckpoint(model, model.config, fmt, path.name, sha256_file(path))


def load_checkpoint(
    path: str | Path, *, image_size: int | None = None, config: str | Path | dict | None = None,
    lora: Any = None,
) -> LoadedCheckpoint:
    """Load an HF directory / ``.safetensors`` file or a Meta ``.pt`` into ``Sam3Model``.

    ``config`` (Sam3Config dict, preset name or JSON path) takes precedence over a
    ``config.json`` beside the checkpoint; ``image_size`` over both. A fine-tuned checkpoint
    that still holds LoRA wrappers (``original_layer`` + ``lora.*``) is merged on load, with
    rank/alpha from ``lora`` (an ``export.lora.LoraOptions``) where the file lacks them.
    Every failure is a CheckpointError (or LoraError) with a one-line reason.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        weights = path / HF_WEIGHTS
        if not weights.is_file():
            if (path / f"{HF_WEIGHTS}.index.json").is_file():
                raise CheckpointError(f"{path.name}: sharded safetensors are not supported; merge into {HF_WEIGHTS}")
            raise CheckpointError(f"{path.name} is a directory without {HF_WEIGHTS}")
        return _load_hf(weights, image_size, config, lora)
    with path.open("rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors":
        return _load_hf(path, image_size, config, lora)
    if len(head) < 8:
        raise CheckpointError(f"{path.name} is empty or truncated ({len(head)} bytes)")
    return _load_meta(path, image_size, config, lora)


def save_hf_checkpoint(model: "Sam3Model", directory: str | Path) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (plain Sam3Model keys, one file)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, max_shard_size="100GB")
    if not (directory / HF_WEIGHTS).is_file():
        raise CheckpointError(f"save_pretrained did not write {HF_WEIGHTS} in {directory}")
    return directory
