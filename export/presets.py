"""Named model shapes shipped with the repo (``export/configs/<name>.json``).

``tiny`` is what tests build, ``demo`` is what the README demo serves, ``sam3_small`` the
SAM3-Small shape (252 px) and ``full`` Meta's published dims. All are plain transformers
``Sam3Config`` dicts, so a preset and a real ``config.json`` go through the same code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).with_name("configs")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def preset_dict(name: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    data = json.loads(path.read_text())
    data.pop("_comment", None)
    return data


def preset_config(name: str):
    """A ``transformers.Sam3Config`` for the preset (imports transformers lazily)."""
    from transformers import Sam3Config

    data = preset_dict(name)
    data.pop("model_type", None)
    return Sam3Config(**data)
