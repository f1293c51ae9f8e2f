"""The model card: read from the checkpoint and adapters, adapters' vocabulary wins."""

from __future__ import annotations

import json

import pytest

from export.model_card import ADAPTER_CARD, MODEL_CARD, read_model_card


def test_checkpoint_card_then_adapter_cards(tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / MODEL_CARD).write_text(json.dumps({"name": "base", "vocabulary": ["red circle"],
                                               "random_weights": False, "trained_with": {"steps": 1}}))
    peft = tmp_path / "lora" / "peft"
    peft.mkdir(parents=True)
    (peft / ADAPTER_CARD).write_text(json.dumps({"name": "star", "vocabulary": ["red circle", "red star"]}))
    pt = tmp_path / "lora" / "weights.pt"
    pt.write_bytes(b"")
    (tmp_path / "lora" / ADAPTER_CARD).write_text(json.dumps({"name": "star-pt"}))

    assert read_model_card(ckpt) == {"name": "base", "vocabulary": ["red circle"], "random_weights": False}
    merged = read_model_card(ckpt, [peft])
    assert merged["vocabulary"] == ["red circle", "red star"] and merged["adapters"] == ["star"]
    assert merged["name"] == "star" and merged["random_weights"] is False
    assert read_model_card(ckpt, [pt])["vocabulary"] == ["red circle"]  # that card names no vocabulary
    assert read_model_card(tmp_path / "no-card") == {}


def test_unreadable_card_is_a_clear_error(tmp_path) -> None:
    (tmp_path / MODEL_CARD).write_text("{not json")
    with pytest.raises(ValueError, match="cannot read model_card.json"):
        read_model_card(tmp_path)
