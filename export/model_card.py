"""The model card a bundle carries in its manifest (``card``): what the model knows, for people.

Read from ``model_card.json`` inside an HF checkpoint directory and from ``adapter_card.json``
inside a PEFT directory or beside a ``.pt`` adapter. An adapter that teaches new concepts
states the vocabulary of the merged model, which then replaces the base's. The random-weight
demo export says ``random_weights: true`` so the demo page can warn that its masks mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

MODEL_CARD = "model_card.json"
ADAPTER_CARD = "adapter_card.json"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def read_model_card(checkpoint: str | Path, adapters: Sequence[str | Path] = ()) -> dict[str, Any]:
    checkpoint = Path(checkpoint)
    card: dict[str, Any] = {}
    if checkpoint.is_dir() and (checkpoint / MODEL_CARD).is_file():
        card = _read(checkpoint / MODEL_CARD)
        card.pop("trained_with", None)  # reproducibility detail: stays with the checkpoint
    for adapter in adapters:
        adapter = Path(adapter)
        path = (adapter if adapter.is_dir() else adapter.parent) / ADAPTER_CARD
        if not path.is_file():
            continue
        extra = _read(path)
        card = {**card, "adapters": [*card.get("adapters", []), extra.get("name", adapter.name)]}
        if "vocabulary" in extra:
            card["vocabulary"] = list(extra["vocabulary"])
        if "name" in extra:
            card["name"] = extra["name"]
    return card
