"""export/checkpoints.py: HF and Meta formats into transformers' Sam3Model, strictly.

The independent reference is Meta's own ``sam3`` package (tests marked ``meta``): a small model
assembled from its classes is saved in both Meta layouts, loaded through ``load_checkpoint``,
and transformers' forward (with one padding box, = Meta's text-only semantics) must match
Meta's forward.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from export.checkpoints import (
    CheckpointError,
    hf_to_meta_state_dict,
    infer_config_from_meta,
    load_checkpoint,
    meta_to_hf_state_dict,
    save_hf_checkpoint,
)
from export.presets import preset_config, preset_dict

def _meta_models():
    """tests/export/meta_models.py, whether or not tests/export is a package."""
    try:
        from tests.export import meta_models
    except ImportError:
        import meta_models  # type: ignore[no-redef]  # pytest put tests/export on sys.path
    return meta_models


IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat" (CLIP BPE)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _inputs(image_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(1, 3, image_size, image_size, generator=g) * 2 - 1
    ids = torch.zeros(1, 32, dtype=torch.long)
    ids[0, : len(IDS)] = torch.tensor(IDS)
    return pixels, ids


@torch.no_grad()
def _hf_forward(model, pixels: torch.Tensor, ids: torch.Tensor):
    """Meta semantics in transformers: one padding box so only the geometry CLS token remains."""
    bsz = pixels.shape[0]
    return model(
        pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long(),
        input_boxes=torch.zeros(bsz, 1, 4), input_boxes_labels=torch.full((bsz, 1), -10),
    )


def _build_hf(config, seed: int = 0):
    from transformers import Sam3Model

    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    return Sam3Model(config).eval()


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def _assert_same_outputs(a, b) -> None:
    # same weights; CPU matmul blocking can still differ in the last bits (measured 2.8e-9)
    for name in ("pred_logits", "pred_boxes", "pred_masks", "presence_logits"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6)


def _assert_same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def _heads(cfg: dict) -> dict:
    """The part of a config the weights cannot tell (what a config.json beside sam3.pt gives)."""
    vb = cfg["vision_config"]["backbone_config"]
    return {
        "vision_config": {"backbone_config": {k: vb[k] for k in ("num_attention_heads", "window_size", "global_attn_indexes", "image_size")}},
        **{s: {"num_attention_heads": cfg[s]["num_attention_heads"]}
           for s in ("text_config", "geometry_encoder_config", "detr_encoder_config", "mask_decoder_config")
           if "num_attention_heads" in cfg.get(s, {})},
    }


# ----------------------------------------------------------------------------------------------
# (a) HF format
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    model = _build_hf(preset_config("tiny"))
    directory = save_hf_checkpoint(model, tmp_path_factory.mktemp("tiny") / "tiny_hf")
    return model, directory


def test_hf_roundtrip_identical(tiny_hf):
    model, directory = tiny_hf
    loaded = load_checkpoint(directory)
    assert loaded.format == "hf" and loaded.source_name == "tiny_hf"
    assert loaded.config._attn_implementation == "eager" and not loaded.model.training
    assert len(loaded.sha256) == 64
    _assert_same_weights(model, loaded.model)
    pixels, ids = _inputs(112)
    _assert_same_outputs(_hf_forward(model, pixels, ids), _hf_forward(loaded.model, pixels, ids))
    # the .safetensors path with config.json beside it is the same checkpoint
    by_file = load_checkpoint(directory / "model.safetensors")
    assert by_file.sha256 == loaded.sha256
    _assert_same_outputs(_hf_forward(model, pixels, ids), _hf_forward(by_file.model, pixels, ids))


def test_hf_detector_model_prefix(tiny_hf, tmp_path):
    """A sam3_video-style file (``detector_model.`` keys + tracker weights) loads the detector."""
    from safetensors.torch import save_file

    model, directory = tiny_hf
    sd = {f"detector_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    sd["tracker_model.some.weight"] = torch.zeros(2)
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "sam3_video", "detector_config": cfg}))
    loaded = load_checkpoint(tmp_path)
    pixels, ids = _inputs(112)
    _assert_same_outputs(_hf_forward(model, pixels, ids), _hf_forward(loaded.model, pixels, ids))


def test_hf_image_size_override(tiny_hf):
    loaded = load_checkpoint(tiny_hf[1], image_size=224)
    vc = loaded.config.vision_config
    assert vc.backbone_config.image_size == 224
    assert vc.backbone_feature_sizes == [[64, 64], [32, 32], [16, 16]]
    out = _hf_forward(loaded.model, *_inputs(224))
    assert out.pred_masks.shape[-2:] == (64, 64)


# ----------------------------------------------------------------------------------------------
# (b) Meta layouts produced by the inverse key map
# ----------------------------------------------------------------------------------------------
def _small_like() -> dict:
    """sam3_small widths (ViT 768/12 heads, text 512/8, d 256, 100 queries, 252 px), shallower."""
    cfg = preset_dict("sam3_small")
    vb = cfg["vision_config"]["backbone_config"]
    vb.update(num_hidden_layers=2, global_attn_indexes=[1])
    cfg["text_config"]["num_hidden_layers"] = 1
    cfg["detr_encoder_config"]["num_layers"] = 1
    cfg["detr_decoder_config"]["num_layers"] = 2
    cfg["geometry_encoder_config"] = {"num_layers": 1}
    return cfg


@pytest.mark.parametrize("shape", ["tiny", "small_like"])
def test_meta_layouts_roundtrip(shape, tmp_path):
    cfg = preset_dict("tiny") if shape == "tiny" else _small_like()
    size = cfg["vision_config"]["backbone_config"]["image_size"]
    model = _build_hf(preset_config("tiny") if shape == "tiny" else _config_from(cfg))
    meta_sd = hf_to_meta_state_dict(model.state_dict(), model.config)
    torch.save({f"detector.{k}": v for k, v in meta_sd.items()} | {"tracker.w": torch.zeros(1)}, tmp_path / "sam3.pt")
    torch.save({"model": meta_sd, "optimizer": {"state": {}}, "epoch": 3}, tmp_path / "checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(_heads(cfg)))  # heads etc. beside the .pt
    for name, fmt in (("sam3.pt", "meta"), ("checkpoint.pt", "meta-trainer")):
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.format == fmt
        _assert_same_weights(model, loaded.model)
        assert loaded.config.vision_config.backbone_config.image_size == size
        assert loaded.config.vision_config.backbone_config.hidden_size == cfg["vision_config"]["backbone_config"]["hidden_size"]
        assert loaded.config.detr_decoder_config.num_queries == model.config.detr_decoder_config.num_queries
        for section in ("text_config", "geometry_encoder_config", "detr_encoder_config",
                        "detr_decoder_config", "mask_decoder_config"):
            assert getattr(loaded.config, section).to_dict() == getattr(model.config, section).to_dict(), section
        assert loaded.config.vision_config.to_dict() == model.config.vision_config.to_dict()
    if shape == "tiny":  # weights and config are identical; one forward (at 252 px: ~9 s, skipped)
        _assert_same_outputs(_hf_forward(model, *_inputs(size)), _hf_forward(loaded.model, *_inputs(size)))


def _config_from(cfg: dict):
    from export.checkpoints import _make_config

    return _make_config(cfg)


def test_meta_to_hf_then_back_is_identity_on_values():
    model = _build_hf(preset_config("tiny"))
    hf_sd = model.state_dict()
    back = meta_to_hf_state_dict(hf_to_meta_state_dict(hf_sd))
    assert back.keys() == hf_sd.keys()
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key


# ----------------------------------------------------------------------------------------------
# (d) full-size key sets, no RAM (meta device)
# ----------------------------------------------------------------------------------------------
def test_full_size_key_map_is_a_bijection():
    from transformers import Sam3Config, Sam3Model

    with torch.device("meta"):
        hf_sd = Sam3Model(Sam3Config()).state_dict()
    meta_sd = hf_to_meta_state_dict(hf_sd)
    back = meta_to_hf_state_dict(meta_sd)
    assert set(back) == set(hf_sd)
    assert all(back[k].shape == hf_sd[k].shape for k in hf_sd)


@pytest.mark.meta
def test_full_meta_structure_maps_without_missing_or_unexpected():
    pytest.importorskip("sam3")
    pytest.importorskip("psutil")
    from transformers import Sam3Config, Sam3Model

    meta_sd = _meta_models().build_full_meta_model_structure().state_dict()
    with torch.device("meta"):
        hf_sd = Sam3Model(Sam3Config()).state_dict()
    mapped = meta_to_hf_state_dict(meta_sd)
    assert set(mapped) - set(hf_sd) == set(), "unexpected"
    assert set(hf_sd) - set(mapped) == set(), "missing"
    assert [k for k in hf_sd if mapped[k].shape != hf_sd[k].shape] == []
    # published dims are fully inferable: no config needed, defaults reproduced
    cfg = infer_config_from_meta(meta_sd, image_size=None, base=None)
    ref = Sam3Config()
    assert cfg.vision_config.backbone_config.to_dict() | {"model_type": 0} == ref.vision_config.backbone_config.to_dict() | {"model_type": 0}
    assert cfg.vision_config.backbone_feature_sizes == ref.vision_config.backbone_feature_sizes
    for section in ("geometry_encoder_config", "detr_encoder_config", "detr_decoder_config", "mask_decoder_config"):
        assert getattr(cfg, section).to_dict() == getattr(ref, section).to_dict(), section
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim", "hidden_act"):
        assert getattr(cfg.text_config, name) == getattr(ref.text_config, name), name


# ----------------------------------------------------------------------------------------------
# (c) Meta's own model vs transformers after load_checkpoint
# ----------------------------------------------------------------------------------------------
META_HEADS = {  # what tests/export/meta_models.MetaDims() cannot carry in its weights
    s: {"num_attention_heads": 2}
    for s in ("text_config", "geometry_encoder_config", "detr_encoder_config", "mask_decoder_config")
}


@pytest.fixture(scope="module")
def meta_small():
    pytest.importorskip("sam3")
    pytest.importorskip("psutil")
    mm = _meta_models()
    dims = mm.MetaDims()
    return dims, mm.build_small_meta_model(dims, seed=0)


@pytest.mark.meta
@pytest.mark.parametrize("layout", ["sam3.pt", "trainer"])
def test_meta_package_parity(meta_small, layout, tmp_path):
    from sam3.model.box_ops import box_cxcywh_to_xyxy

    meta_forward = _meta_models().meta_forward

    dims, meta_model = meta_small
    sd = meta_model.state_dict()
    if layout == "sam3.pt":
        path = tmp_path / "sam3.pt"
        torch.save({f"detector.{k}": v for k, v in sd.items()} | {"tracker.maskmem_tpos_enc": torch.zeros(3)}, path)
        (tmp_path / "config.json").write_text(json.dumps(META_HEADS))
        loaded = load_checkpoint(path)
    else:
        path = tmp_path / "checkpoint.pt"
        torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 1}, path)
        loaded = load_checkpoint(path, config=META_HEADS)
    assert loaded.format == ("meta" if layout == "sam3.pt" else "meta-trainer")
    bb = loaded.config.vision_config.backbone_config
    # read from Meta's freqs_cis, not given anywhere:
    assert (bb.image_size, bb.window_size, bb.global_attn_indexes, bb.num_attention_heads) == (
        dims.image_size, dims.window_size, list(dims.global_blocks), dims.vit_heads)

    pixels, ids = _inputs(dims.image_size)
    ref = meta_forward(meta_model, pixels, ids)
    out = _hf_forward(loaded.model, pixels, ids)
    assert torch.isfinite(ref["pred_logits"]).all()
    logit_err = (out.pred_logits - ref["pred_logits"]).abs().max().item()
    presence_err = (out.presence_logits - ref["presence"]).abs().max().item()
    box_err = (out.pred_boxes - box_cxcywh_to_xyxy(ref["pred_boxes"])).abs().max().item()
    iou = _mask_iou(out.pred_masks, ref["pred_masks"])
    # measured: logits 3.0e-6, presence 6.0e-7, boxes 0.0, mask IoU 1.0
    assert logit_err <= 1e-3 and presence_err <= 1e-3 and box_err <= 1e-4, (logit_err, presence_err, box_err)
    assert iou >= 0.99, iou
    assert out.pred_logits.argmax() == ref["pred_logits"].argmax()


@pytest.mark.meta
def test_meta_package_text_only_differs_without_padding_box(meta_small, tmp_path):
    """Guards the semantics: without the padding box transformers skips the CLS token."""
    meta_forward = _meta_models().meta_forward

    dims, meta_model = meta_small
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": meta_model.state_dict()}, path)
    loaded = load_checkpoint(path, config=META_HEADS)
    pixels, ids = _inputs(dims.image_size)
    with torch.no_grad():
        plain = loaded.model(pixel_values=pixels, input_ids=ids, attention_mask=(ids != 0).long())
    ref = meta_forward(meta_model, pixels, ids)
    assert (plain.pred_logits - ref["pred_logits"]).abs().max().item() > 1e-3


# ----------------------------------------------------------------------------------------------
# (e) errors: one line, naming the problem
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_meta_sd():
    model = _build_hf(preset_config("tiny"))
    return hf_to_meta_state_dict(model.state_dict())


def test_error_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "nope.pt")
    assert "not found" in _one_line(exc)


def test_error_text_file_renamed_pt(tmp_path):
    path = tmp_path / "sam3.pt"
    path.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    assert "cannot read sam3.pt" in _one_line(exc)


def test_error_truncated_safetensors(tiny_hf, tmp_path):
    data = (tiny_hf[1] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "config.json").write_bytes((tiny_hf[1] / "config.json").read_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path)
    assert "safetensors" in _one_line(exc)


def test_error_missing_layer(tiny_meta_sd, tmp_path):
    sd = {k: v for k, v in tiny_meta_sd.items() if not k.startswith("transformer.decoder.layers.1.linear2.")}
    torch.save(sd, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "checkpoint.pt", config="tiny")
    msg = _one_line(exc)
    assert "missing 2" in msg and "detr_decoder.layers.1.mlp.fc2.weight" in msg


def test_error_unknown_key(tiny_meta_sd, tmp_path):
    torch.save(tiny_meta_sd | {"transformer.decoder.extra_head.weight": torch.zeros(3)}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "c.pt", config="tiny")
    assert "transformer.decoder.extra_head.weight" in _one_line(exc)


def test_error_hf_missing_layer(tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_hf[1] / "model.safetensors"))
    del sd["mask_decoder.instance_projection.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((tiny_hf[1] / "config.json").read_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path)
    assert "mask_decoder.instance_projection.weight" in _one_line(exc)


def _tiny_without_image_size() -> dict:
    """Resolution stated only through backbone_feature_sizes (grid 8 -> 112 px)."""
    cfg = preset_dict("tiny")
    del cfg["vision_config"]["backbone_config"]["image_size"]
    return cfg


def test_error_image_size_not_a_multiple_of_the_patch(tiny_meta_sd, tmp_path):
    torch.save(tiny_meta_sd, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "checkpoint.pt", config="tiny", image_size=100)
    assert "not a positive multiple of the patch size 14" in _one_line(exc)


@pytest.mark.parametrize(
    ("image_size", "config"),
    [
        (224, "pinned"),  # feature sizes for 112 px, no image_size in the config, --image-size 224
        (None, "stale"),  # the config's own image_size 224 with the feature sizes of 112 px
    ],
)
def test_stale_feature_sizes_do_not_decide_the_resolution(tiny_meta_sd, tmp_path, image_size, config):
    """Sam3Model never reads backbone_feature_sizes: the image size wins, the sizes are derived."""
    if config == "pinned":
        config = _tiny_without_image_size()
    else:
        config = preset_dict("tiny")
        config["vision_config"]["backbone_config"]["image_size"] = 224
    torch.save(tiny_meta_sd, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt", config=config, image_size=image_size)
    assert loaded.config.vision_config.backbone_config.image_size == 224
    assert loaded.config.vision_config.backbone_feature_sizes == [[64, 64], [32, 32], [16, 16]]


def test_feature_sizes_alone_give_the_resolution(tiny_meta_sd, tmp_path):
    torch.save(tiny_meta_sd, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt", config=_tiny_without_image_size())
    assert loaded.config.vision_config.backbone_config.image_size == 112


def test_image_size_without_feature_sizes_sets_them(tiny_meta_sd, tmp_path):
    cfg = preset_dict("tiny")
    del cfg["vision_config"]["backbone_feature_sizes"]
    torch.save(tiny_meta_sd, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path / "checkpoint.pt", config=cfg, image_size=224)
    assert loaded.config.vision_config.backbone_feature_sizes == [[64, 64], [32, 32], [16, 16]]


def test_error_config_missing_for_non_default_dims(tiny_meta_sd, tmp_path):
    torch.save(tiny_meta_sd, tmp_path / "checkpoint.pt")  # no freqs_cis, no config.json
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "checkpoint.pt")
    msg = _one_line(exc)
    assert "num_attention_heads" in msg and "config.json" in msg


def test_error_config_contradicts_weights(tiny_meta_sd, tmp_path):
    cfg = copy.deepcopy(preset_dict("tiny"))
    cfg["detr_decoder_config"]["num_queries"] = 20
    torch.save(tiny_meta_sd, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "checkpoint.pt", config=cfg)
    assert "detr_decoder_config.num_queries=20" in _one_line(exc)


def test_error_hf_dir_without_config(tiny_hf, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((tiny_hf[1] / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path)
    assert "config.json" in _one_line(exc)


def test_error_not_sam3(tmp_path):
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "epoch": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(tmp_path / "other.pt")
    assert "not a SAM3 checkpoint" in _one_line(exc)
