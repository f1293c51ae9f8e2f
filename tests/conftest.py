"""Session fixtures: the tiny random SAM3 is built once, saved as a real HF checkpoint, and
exported once through the same code path users run (`python -m export build`)."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_SEED = 0


def make_tiny_model(preset: str = "tiny", seed: int = TINY_SEED):
    import torch
    from transformers import Sam3Model

    from export.presets import preset_config

    torch.manual_seed(seed)
    config = preset_config(preset)
    config._attn_implementation = "eager"
    return Sam3Model(config).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, tiny_model) -> Path:
    """A tiny model saved exactly as `Sam3Model.save_pretrained` writes the hub format."""
    directory = tmp_path_factory.mktemp("ckpt") / "sam3-tiny"
    tiny_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_hf_checkpoint) -> Path:
    """The tiny checkpoint exported by `python -m export build` (in-process)."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    code = main(["build", "--checkpoint", str(tiny_hf_checkpoint), "--out", str(out), "--name", "sam3-tiny"])
    assert code == 0, "tiny bundle build failed"
    return out
