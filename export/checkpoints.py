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
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from engines.bundle import sha256_file
from export.errors import CheckpointError, short_list
from export.model_config import DEFAULT_SCALE_FACTORS, UnsupportedConfig, fpn_sizes
from export.keymap import hf_to_meta_state_dict, meta_to_hf_state_dict

__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "hf_to_meta_state_dict",
    "infer_config_from_meta",
    "load_checkpoint",
    "meta_to_hf_state_dict",
    "save_hf_checkpoint",
]

if TYPE_CHECKING:  # transformers is imported lazily: importing it costs seconds
    from transformers import Sam3Config, Sam3Model

HF_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"
HF_PREFIX = "detector_model."  # Sam3Model.base_model_prefix; a sam3_video checkpoint nests it there
HF_IGNORED_PREFIXES = ("tracker_model.", "tracker_neck.")  # Sam3Model._keys_to_ignore_on_load_unexpected
META_PREFIX = "detector."
META_IGNORED_PREFIXES = ("tracker.",)
META_PROBE_KEY = "backbone.vision_backbone.trunk.patch_embed.proj.weight"


@dataclass
class LoadedCheckpoint:
    model: "Sam3Model"  # eval mode, fp32, eager attention
    config: "Sam3Config"
    format: str  # "hf" | "meta" | "meta-trainer"
    source_name: str  # file or directory name
    sha256: str  # of the weights file (for a directory: of model.safetensors)


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


def _resolve_image_size(
    image_size: int | None, base: dict[str, Any], patch: int, rope: _RopeFacts | None
) -> int | None:
    """``image_size`` arg > the config's image_size > Meta's global RoPE grid > the config's
    ``backbone_feature_sizes``.

    The feature sizes are only a hint, used when nothing else tells the resolution: the model
    never reads them (export/model_config.py), so a stale value is no error.
    """
    given_vision = base.get("vision_config", {})
    size = image_size if image_size is not None else given_vision.get("backbone_config", {}).get("image_size")
    if size is None and rope is not None and rope.grid is not None:
        size = rope.grid * patch
    sizes = given_vision.get("backbone_feature_sizes")
    scales = given_vision.get("scale_factors") or DEFAULT_SCALE_FACTORS
    if size is None and sizes and len(scales) >= 2:
        size = round(sizes[-1][0] / float(scales[len(sizes) - 1])) * patch
    if size is None:
        return None
    if size <= 0 or size % patch:
        raise CheckpointError(f"image size {size} is not a positive multiple of the patch size {patch}")
    return int(size)


def _fpn_sizes(size: int, patch: int, vision: dict[str, Any]) -> list[list[int]]:
    try:
        return fpn_sizes(size, patch, vision.get("scale_factors"))
    except UnsupportedConfig as exc:
        raise CheckpointError(str(exc)) from None


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
    merged["vision_config"]["backbone_feature_sizes"] = _fpn_sizes(size, patch, merged["vision_config"])
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
        raise CheckpointError(f"{name} has no tensor state dict (top-level keys: {short_list(map(str, obj))})")
    if any(k.startswith(META_PREFIX) for k in sd):
        others = [k for k in sd if not k.startswith(META_PREFIX) and not k.startswith(META_IGNORED_PREFIXES)]
        if others:
            raise CheckpointError(f"{name}: keys outside detector./tracker.: {short_list(others)}")
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
            parts.append(f"missing {len(missing)}: {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {short_list(unexpected)}")
        raise CheckpointError("checkpoint does not match the SAM3 model: " + "; ".join(parts))
    bad = [f"{k} {tuple(state_dict[k].shape)} vs {expected[k]}" for k in expected
           if tuple(state_dict[k].shape) != expected[k]]
    if bad:
        raise CheckpointError(f"shape mismatch in {len(bad)} tensor(s) (checkpoint vs config): {short_list(bad, 3)}")
    fp32 = {k: (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()}
    model.load_state_dict(fp32, strict=True, assign=True)
    return model.float().eval()


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
def _apply_image_size(cfg: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """HF configs: ``image_size`` overrides the resolution; the feature sizes follow it.

    Without ``image_size`` the config is taken as transformers takes it: a stale
    ``backbone_feature_sizes`` is the build's note, not an error here.
    """
    cfg = copy.deepcopy(cfg)
    if image_size is None:
        return cfg
    vision = cfg.setdefault("vision_config", {})
    backbone = vision.setdefault("backbone_config", {})
    patch = backbone.get("patch_size", 14)
    size = _resolve_image_size(image_size, cfg, patch, None)
    assert size is not None
    backbone["image_size"] = size
    vision["backbone_feature_sizes"] = _fpn_sizes(size, patch, vision)
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
