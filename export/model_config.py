"""What the exporter reads from a ``Sam3Config``, and whether the three graphs can represent it.

transformers' ``Sam3Model`` takes its FPN geometry from ``image_size``, ``patch_size`` and
``vision_config.scale_factors`` alone: the ViT grid is ``image_size // patch_size``,
``Sam3FPNLayer`` makes one level per scale factor (4: two stride-2 transposed convolutions,
2: one, 1: the grid itself, 0.5: a 2x2 max pool), and ``Sam3Model.forward`` drops the last
level. ``vision_config.backbone_feature_sizes`` is never read by the model; a config created
with a smaller ``image_size`` keeps its 1008 px default. So the exporter derives the sizes here
and records a stale value as a note in the manifest instead of refusing the config.

The graphs follow the kept levels, however many there are (``fpn_0`` .. ``fpn_{k-1}``; the
runtime feeds the decoder by name). What they cannot represent is refused with the reason.
"""

from __future__ import annotations

from typing import Any

from export.tokenizer import CONTEXT_LENGTH, VOCAB_SIZE

DEFAULT_SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)  # Sam3VisionConfig's default
FPN_PREFIX = "fpn_"


class UnsupportedConfig(ValueError):
    """A Sam3Config the exported graphs cannot represent; the message is the reason."""


def _level_size(scale: float, grid: int) -> int:
    if scale == 4.0:
        return 4 * grid
    if scale == 2.0:
        return 2 * grid
    if scale == 1.0:
        return grid
    if scale == 0.5:
        return grid // 2
    raise UnsupportedConfig(
        f"vision_config.scale_factors has {scale}: transformers' Sam3FPNLayer builds only 4.0, 2.0, 1.0 and 0.5"
    )


def fpn_sizes(image_size: int, patch_size: int, scale_factors: Any = None) -> list[list[int]]:
    """[height, width] of the FPN levels ``Sam3Model`` uses (every level but the last), as the
    model computes them; the same layout as ``backbone_feature_sizes``."""
    scales = tuple(float(s) for s in (DEFAULT_SCALE_FACTORS if scale_factors is None else scale_factors))
    grid = int(image_size) // int(patch_size)
    sizes = [_level_size(scale, grid) for scale in scales]
    if len(sizes) < 2:
        raise UnsupportedConfig(
            f"vision_config.scale_factors {list(scales)} leaves no FPN level: Sam3Model drops the last "
            "level, and the DETR encoder needs one"
        )
    return [[size, size] for size in sizes[:-1]]


def kept_fpn_sizes(config: Any) -> list[tuple[int, int]]:
    """(height, width) of each FPN level the graphs carry, finest first."""
    vision = config.vision_config
    sizes = fpn_sizes(vision.backbone_config.image_size, vision.backbone_config.patch_size, vision.scale_factors)
    return [(h, w) for h, w in sizes]


def fpn_names(config: Any) -> tuple[str, ...]:
    """Tensor names of the FPN levels (``engines.bundle.TensorNames.FPN`` for SAM3's four scales)."""
    return tuple(f"{FPN_PREFIX}{i}" for i in range(len(kept_fpn_sizes(config))))


def check_exportable(config: Any) -> list[str]:
    """Raise :class:`UnsupportedConfig` with the reason, or return notes for the manifest."""
    sizes = kept_fpn_sizes(config)
    stages = int(config.mask_decoder_config.num_upsampling_stages)
    if stages < len(sizes) - 1:
        raise UnsupportedConfig(
            f"mask_decoder_config.num_upsampling_stages {stages} cannot merge {len(sizes)} FPN levels "
            f"(vision_config.scale_factors {list(config.vision_config.scale_factors)}): it needs {len(sizes) - 1}"
        )
    text = config.text_config
    if int(text.vocab_size) < VOCAB_SIZE:
        raise UnsupportedConfig(
            f"text_config.vocab_size {text.vocab_size} is smaller than the CLIP tokenizer the bundle ships "
            f"({VOCAB_SIZE} tokens): real prompts would index past the text embedding"
        )
    if int(text.max_position_embeddings) < CONTEXT_LENGTH:
        raise UnsupportedConfig(
            f"text_config.max_position_embeddings {text.max_position_embeddings} is shorter than the "
            f"tokenizer's context of {CONTEXT_LENGTH} tokens"
        )
    notes = []
    stated = config.vision_config.backbone_feature_sizes
    derived = [list(size) for size in sizes]
    if stated is not None and [list(s) for s in stated] != derived:
        notes.append(
            f"vision_config.backbone_feature_sizes {[list(s) for s in stated]} ignored: Sam3Model never reads it; "
            f"image_size {config.vision_config.backbone_config.image_size}, patch "
            f"{config.vision_config.backbone_config.patch_size} and scale_factors "
            f"{list(config.vision_config.scale_factors)} give {derived}"
        )
    return notes
