"""Which weights each exported graph uses, and a content hash of them.

The hashes go into the manifest (``parts.*.weights_sha256``): two bundles whose image encoders
hash the same (LoRA adapters on the decoder only) can share one image-encoder engine and one
embedding cache. ``export/build.py`` writes them, ``export/lora.py`` records the base model's.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

PARTS = ("image_encoder", "text_encoder", "decoder")


def weights_sha256(module: nn.Module) -> str:
    """Content hash of a module's weights (names, shapes, dtypes, values), independent of any file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def part_modules(model: nn.Module, part: str) -> dict[str, nn.Module]:
    """The ``Sam3Model`` submodules whose weights the graph ``part`` uses, by attribute name."""
    if part == "image_encoder":
        return {"vision_encoder": model.vision_encoder, "geometry_encoder": model.geometry_encoder}
    if part == "text_encoder":
        return {"text_encoder": model.text_encoder, "text_projection": model.text_projection}
    if part in ("decoder", "exemplar_decoder"):
        # The geometry encoder belongs to the image encoder: its box-free CLS token is computed there.
        return {name: getattr(model, name) for name in
                ("detr_encoder", "detr_decoder", "mask_decoder", "dot_product_scoring")}
    if part == "geometry_encoder":  # the exemplar graph: boxes -> geometry tokens
        return {"geometry_encoder": model.geometry_encoder}
    raise ValueError(f"unknown part {part!r}")


def part_weights_sha256(model: nn.Module, part: str) -> str:
    return weights_sha256(nn.ModuleDict(part_modules(model, part)))


def part_parameter_count(model: nn.Module, part: str) -> int:
    """Parameters of ``part``, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for module in part_modules(model, part).values():
        for param in module.parameters():
            if id(param) not in seen:
                seen.add(id(param))
                total += param.numel()
    return total
