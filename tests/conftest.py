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


REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPES_MODEL = REPO_ROOT / "models" / "shapes"
STAR_LORA = REPO_ROOT / "models" / "shapes-star-lora"


@pytest.fixture(scope="session")
def shapes_bundle(tmp_path_factory) -> Path:
    """The shipped, trained demo model exported through the CLI, as `make demo` does."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("bundles") / "shapes"
    assert main(["build", "--checkpoint", str(SHAPES_MODEL), "--out", str(out), "--skip-fp16-error-run",
                 "--verify-cases", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def star_bundle(tmp_path_factory) -> Path:
    """The shipped model with the shipped star adapter (PEFT directory) merged at export."""
    from export.__main__ import main

    out = tmp_path_factory.mktemp("bundles") / "shapes-star"
    assert main(["build", "--checkpoint", str(SHAPES_MODEL), "--lora", str(STAR_LORA / "peft"), "--out", str(out),
                 "--skip-fp16-error-run", "--verify-cases", "2"]) == 0
    return out


def text_only_copy(bundle: Path, dest: Path) -> Path:
    """A copy of ``bundle`` as written before exemplar prompts: no geometry graphs, no exemplar parity."""
    import json
    import shutil

    from engines.bundle import EXEMPLAR_PART_NAMES, MANIFEST_FILE

    shutil.copytree(bundle, dest, ignore=shutil.ignore_patterns("engines"))
    data = json.loads((dest / MANIFEST_FILE).read_text())
    for name in EXEMPLAR_PART_NAMES:
        (dest / data["parts"].pop(name)["file"]).unlink()
    data.get("parity", {}).pop("exemplars", None)
    (dest / MANIFEST_FILE).write_text(json.dumps(data))
    return dest
