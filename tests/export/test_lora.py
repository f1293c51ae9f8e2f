"""LoRA adapters merged before export (export/lora.py), checked against the UNMERGED adapters.

Independence of the references: PEFT adapters are checked against PEFT's own unmerged model;
SAM3-LoRA-layout adapters (Meta names) against forward hooks on transformers' modules that add
``x @ A @ B * alpha/r`` at run time, through a module-name table written by hand below (not the
key map or the merge code under test). Two real CLI builds (``python -m export build --lora``)
compare ONNX Runtime with those references; the other tests stay in PyTorch to keep CI short.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from engines.bundle import Bundle
from engines.bundle import TensorNames as T
from export.__main__ import main
from export.checkpoints import hf_to_meta_state_dict, meta_to_hf_state_dict
from export.lora import LoraError, LoraOptions, has_lora_wrappers, merge_adapters, unwrap_lora_state_dict
from export.split import reference_forward

RANK, ALPHA = 4, 8.0
PARTS = ("image_encoder", "text_encoder", "decoder")

# Meta module -> transformers module(s), by hand. A list is a fused qkv Linear (Meta's ViT):
# its B columns [0:E], [E:2E], [2E:3E] feed q_proj, k_proj, v_proj.
_VIT_QKV = [f"vision_encoder.backbone.layers.0.attention.{p}_proj" for p in "qkv"]
META_ADAPTER_MODULES: dict[str, str | list[str]] = {
    "backbone.vision_backbone.trunk.blocks.0.attn.qkv": _VIT_QKV,
    # nn.MultiheadAttention split into q/k/v/out_proj -> in_proj_weight row blocks
    "backbone.language_backbone.encoder.transformer.resblocks.1.attn.v_proj": "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
    "transformer.decoder.layers.0.self_attn.q_proj": "detr_decoder.layers.0.self_attn.q_proj",
    "transformer.decoder.layers.1.ca_text.k_proj": "detr_decoder.layers.1.text_cross_attn.k_proj",
    "segmentation_head.cross_attend_prompt.v_proj": "mask_decoder.prompt_cross_attn.v_proj",
    "transformer.encoder.layers.0.cross_attn_image.out_proj": "detr_encoder.layers.0.cross_attn.o_proj",
    "transformer.decoder.layers.1.linear1": "detr_decoder.layers.1.mlp.fc1",
}
# full fine-tuned checkpoint with SAM3-LoRA LoRALinear wrappers (original_layer + lora)
WRAPPED_MODULES: dict[str, str] = {
    "backbone.vision_backbone.trunk.blocks.1.mlp.fc1": "vision_encoder.backbone.layers.1.mlp.fc1",
    "backbone.language_backbone.encoder.transformer.resblocks.0.mlp.c_proj": "text_encoder.text_model.encoder.layers.0.mlp.fc2",
    "transformer.decoder.layers.0.cross_attn.q_proj": "detr_decoder.layers.0.vision_cross_attn.q_proj",  # split MHA
    "transformer.decoder.layers.0.linear2": "detr_decoder.layers.0.mlp.fc2",
}
PEFT_DECODER_TARGETS = [
    "detr_decoder.layers.0.self_attn.q_proj",
    "detr_decoder.layers.1.text_cross_attn.v_proj",
    "mask_decoder.prompt_cross_attn.o_proj",
    "detr_encoder.layers.0.mlp.fc1",
]
PEFT_VISION_TARGETS = [
    "vision_encoder.backbone.layers.1.attention.o_proj",
    "vision_encoder.backbone.layers.0.mlp.fc2",
    "detr_decoder.layers.1.mlp.fc2",
]
SAM3_LORA_YAML = """\
# SAM3-LoRA training config (configs/*.yaml layout)
model:
  name: facebook/sam3
lora:
  rank: 4
  alpha: 8
  dropout: 0.0
  target_modules: [q_proj, k_proj, v_proj, out_proj, linear1]
  apply_to_vision_encoder: true
  apply_to_text_encoder: true
  apply_to_detr_decoder: true
training:
  batch_size: 1
"""


# ----------------------------------------------------------------------------------------------
# Independent reference: the low-rank update applied at run time
# ----------------------------------------------------------------------------------------------
@dataclass
class Update:
    """``y = Linear(x) + x @ a @ b * scale`` on a transformers module (a [in, r], b [r, out])."""

    module: str
    a: Tensor
    b: Tensor
    scale: float


@contextlib.contextmanager
def lora_hooks(model, updates: list[Update]) -> Iterator[None]:
    handles = []
    for update in updates:

        def hook(module, args, output, u=update):
            return output + (args[0] @ u.a @ u.b) * u.scale

        handles.append(model.get_submodule(update.module).register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _low_rank(generator: torch.Generator, d_in: int, d_out: int, std: float = 0.1) -> tuple[Tensor, Tensor]:
    return torch.randn(d_in, RANK, generator=generator) * std, torch.randn(
        RANK, d_out, generator=generator
    ) * std


def meta_lora(model, table: dict[str, str | list[str]], seed: int) -> tuple[dict[str, Tensor], list[Update]]:
    """A SAM3-LoRA ``.pt`` (A [in, r], B [r, out]) and the same update as hooks."""
    g = torch.Generator().manual_seed(seed)
    sd, updates = {}, []
    for meta_module, hf in table.items():
        hf_modules = hf if isinstance(hf, list) else [hf]
        first = model.get_submodule(hf_modules[0])
        a, b = _low_rank(g, first.in_features, first.out_features * len(hf_modules))
        sd[f"{meta_module}.lora.lora_A"], sd[f"{meta_module}.lora.lora_B"] = a, b
        width = first.out_features
        updates += [
            Update(name, a, b[:, i * width : (i + 1) * width], ALPHA / RANK)
            for i, name in enumerate(hf_modules)
        ]
    return sd, updates


def wrapped_full_checkpoint(model, seed: int) -> tuple[dict[str, Tensor], list[Update]]:
    """The base model's Meta state dict with SAM3-LoRA ``LoRALinear`` wrappers left in place.

    The decoder's vision cross-attention is stored as a split MHA (q/k/v/out_proj Linears, q
    wrapped), as SAM3-LoRA variants that replace nn.MultiheadAttention save it.
    """
    sd = dict(hf_to_meta_state_dict(model.state_dict()))
    g = torch.Generator().manual_seed(seed)
    mha = "transformer.decoder.layers.0.cross_attn."
    for w in ("weight", "bias"):
        for name, block in zip(("q_proj", "k_proj", "v_proj"), sd.pop(f"{mha}in_proj_{w}").chunk(3)):
            sd[f"{mha}{name}.{w}"] = block.clone()
    updates = []
    for meta_module, hf_module in WRAPPED_MODULES.items():
        for w in ("weight", "bias"):
            sd[f"{meta_module}.original_layer.{w}"] = sd.pop(f"{meta_module}.{w}")
        linear = model.get_submodule(hf_module)
        a, b = _low_rank(g, linear.in_features, linear.out_features)
        sd[f"{meta_module}.lora.lora_A"], sd[f"{meta_module}.lora.lora_B"] = a, b
        updates.append(Update(hf_module, a, b, ALPHA / RANK))
    return sd, updates


def peft_model(base, targets: list[str], *, alpha: float, rslora: bool, seed: int):
    """PEFT-wrapped copy of ``base`` with random non-zero lora_B (PEFT initialises it to 0)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # PEFT draws lora_A from the global generator
    model = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=RANK, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, lora_dropout=0.0),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    return model.eval()


def peft_state_dict_updates(model, lora_sd: dict[str, Tensor], scale: float) -> list[Update]:
    """Hooks equivalent to a PEFT-orientation state dict (A [r, in], B [out, r])."""
    updates = []
    for key, a in lora_sd.items():
        if ".lora_A." in key:
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            updates.append(Update(module, a.t(), lora_sd[key.replace(".lora_A.", ".lora_B.")].t(), scale))
    return updates


# ----------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Real photos + synthetic images with several prompts, prepared as the build prepares them."""
    from engines.bundle import Preprocessing, TokenizerInfo
    from engines.preprocess import to_pixel_values
    from engines.tokenizer import PromptTokenizer
    from export import verify
    from export.build import DEFAULT_PROMPTS
    from export.tokenizer import write_tokenizer_json

    directory = tmp_path_factory.mktemp("tokenizer")
    info = TokenizerInfo(**write_tokenizer_json(directory / "tokenizer.json"))
    tokenizer = PromptTokenizer(directory / "tokenizer.json", info)
    preprocessing = Preprocessing(image_size=112)
    return verify.build_cases(
        verify.sample_photos(),
        lambda px: to_pixel_values(px, preprocessing),
        tokenizer.encode,
        DEFAULT_PROMPTS,
    )


@pytest.fixture(scope="module")
def meta_adapter(tmp_path_factory, tiny_model):
    sd, updates = meta_lora(tiny_model, META_ADAPTER_MODULES, seed=1)
    path = tmp_path_factory.mktemp("lora") / "sam3_lora_best.pt"
    torch.save(sd, path)
    return path, sd, updates


@pytest.fixture(scope="module")
def peft_state_dict_adapter(tmp_path_factory, tiny_model):
    """Format 3: PEFT trained, saved as {"lora_state_dict": ..., "lora_config": ...}; alpha 4 (scale 1)."""
    from peft import get_peft_model_state_dict

    model = peft_model(tiny_model, PEFT_VISION_TARGETS, alpha=4.0, rslora=False, seed=2)
    lora_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    path = tmp_path_factory.mktemp("lora") / "adapter_state.pt"
    torch.save({"lora_state_dict": lora_sd, "lora_config": {"r": RANK, "lora_alpha": 4.0}, "epoch": 3}, path)
    return path, model, peft_state_dict_updates(tiny_model, lora_sd, 4.0 / RANK)


@pytest.fixture(scope="module")
def peft_decoder_adapter(tmp_path_factory, tiny_model):
    """Format 1: a PEFT directory touching only decoder weights, with rsLoRA scaling."""
    model = peft_model(tiny_model, PEFT_DECODER_TARGETS, alpha=ALPHA, rslora=True, seed=3)
    directory = tmp_path_factory.mktemp("lora") / "sam3-peft-decoder"
    model.save_pretrained(directory)
    return directory, model


@pytest.fixture(scope="module")
def lora_yaml(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lora") / "lora_minimal.yaml"
    path.write_text(SAM3_LORA_YAML)
    return path


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _forward(model, case) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = reference_forward(model, case.pixel_values, case.input_ids, case.attention_mask)
    return {k: v.numpy() for k, v in out.items()}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    from export.verify import mask_iou

    return mask_iou(a, b)


def _compare(got: list[dict], ref: list[dict]) -> dict[str, float]:
    return {
        "logits_max_abs": max(
            float(np.abs(g[T.PRED_LOGITS] - r[T.PRED_LOGITS]).max()) for g, r in zip(got, ref)
        ),
        "presence_max_abs": max(
            float(np.abs(g[T.PRESENCE_LOGITS] - r[T.PRESENCE_LOGITS]).max()) for g, r in zip(got, ref)
        ),
        "boxes_max_abs": max(
            float(np.abs(g[T.PRED_BOXES] - r[T.PRED_BOXES]).max()) for g, r in zip(got, ref)
        ),
        "mask_iou_min": min(_iou(g[T.PRED_MASKS], r[T.PRED_MASKS]) for g, r in zip(got, ref)),
    }


def _assert_parity(
    name: str, got: list[dict], ref: list[dict], logits_bound: float = 1e-3
) -> dict[str, float]:
    figures = _compare(got, ref)
    print(f"\nparity {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
    assert figures["logits_max_abs"] <= logits_bound, figures
    assert figures["presence_max_abs"] <= logits_bound, figures
    assert figures["mask_iou_min"] >= 0.99, figures
    return figures


def _assert_differs(name: str, got: list[dict], base: list[dict], parity: dict[str, float]) -> None:
    """The adapter really applied: masks beyond the build's IoU bound, logits far beyond export error.

    (Random tiny models have logits ~1e-2, so an absolute logits threshold would say little.)
    """
    diff = _compare(got, base)
    print(
        f"merged vs base {name}: logits {diff['logits_max_abs']:.3g}, presence {diff['presence_max_abs']:.3g}, "
        f"mask IoU {diff['mask_iou_min']:.4f}"
    )
    assert diff["mask_iou_min"] < 0.99, diff
    assert diff["logits_max_abs"] > max(100 * parity["logits_max_abs"], 1e-5), (diff, parity)


def _ort_outputs(bundle_dir: Path, cases) -> list[dict]:
    from export.verify import ort_session, run_chain

    manifest = Bundle(bundle_dir).manifest
    sessions = {p: ort_session(bundle_dir / manifest.part(p).file) for p in PARTS}
    return [run_chain(sessions, case) for case in cases]


def _cli_build(args: list[str], out: Path) -> int:
    """The real CLI, in-process; parity is checked by the test itself on all cases (one in the build)."""
    return main(["build", *args, "--out", str(out), "--skip-fp16-check", "--verify-cases", "1"])


def _cli_fails(args: list[str], out: Path, capsys) -> str:
    code = _cli_build(args, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert not out.exists(), "a failed build must not write the bundle"
    assert not list(out.parent.glob(f".{out.name}*")), "staging directory left behind"
    return err[-1] if err else ""


# ----------------------------------------------------------------------------------------------
# Per-format merge == unmerged adapters (PyTorch, fast)
# ----------------------------------------------------------------------------------------------
def test_meta_lora_merge_matches_hooks_including_mha_in_proj(tiny_model, meta_adapter, cases):
    path, _, updates = meta_adapter
    with lora_hooks(tiny_model, updates):
        ref = [_forward(tiny_model, c) for c in cases]
    model, infos = merge_adapters(
        copy.deepcopy(tiny_model),
        [str(path)],
        LoraOptions(rank=RANK, alpha=ALPHA, config=None),
        checkpoint_format="meta-trainer",
    )
    merged = [_forward(model, c) for c in cases]
    parity = _assert_parity("meta-lora (PyTorch merged vs hooks)", merged, ref, 1e-4)
    _assert_differs("meta-lora", merged, [_forward(tiny_model, c) for c in cases], parity)
    info = infos[0]
    assert info["format"] == "meta-lora" and info["namespace"] == "meta"
    assert (
        info["merged_weights"] == len(META_ADAPTER_MODULES)
        and info["rank"] == RANK
        and info["alpha"] == ALPHA
    )
    assert info["parts"] == ["image_encoder", "text_encoder", "decoder"]


def test_meta_lora_in_proj_blocks_exactly(tiny_model, meta_adapter):
    """Only the targeted row block of a fused in_proj_weight moves, by exactly (A@B)^T*alpha/r."""
    _, sd, _ = meta_adapter
    model, _ = merge_adapters(
        copy.deepcopy(tiny_model), [str(meta_adapter[0])], LoraOptions(RANK, ALPHA, None), "hf"
    )
    key = "transformer.decoder.layers.1.ca_text.in_proj_weight"
    before, after = (
        hf_to_meta_state_dict(tiny_model.state_dict())[key],
        hf_to_meta_state_dict(model.state_dict())[key],
    )
    e = before.shape[0] // 3
    a, b = (
        sd["transformer.decoder.layers.1.ca_text.k_proj.lora.lora_A"],
        sd["transformer.decoder.layers.1.ca_text.k_proj.lora.lora_B"],
    )
    torch.testing.assert_close(
        after[e : 2 * e] - before[e : 2 * e], (a @ b).t() * ALPHA / RANK, atol=1e-6, rtol=1e-5
    )
    assert torch.equal(after[:e], before[:e]) and torch.equal(after[2 * e :], before[2 * e :])


def test_peft_state_dict_merge_matches_peft_unmerged(tiny_model, peft_state_dict_adapter, cases):
    path, unmerged, _ = peft_state_dict_adapter
    ref = [_forward(unmerged.get_base_model(), c) for c in cases]
    model, infos = merge_adapters(copy.deepcopy(tiny_model), [str(path)], LoraOptions(None, None, None), "hf")
    _assert_parity(
        "peft-state-dict (PyTorch merged vs PEFT unmerged)", [_forward(model, c) for c in cases], ref, 1e-4
    )
    assert infos[0]["format"] == "peft-state-dict" and infos[0]["alpha"] == 4.0
    assert infos[0]["parts"] == ["image_encoder", "decoder"]


def test_unwrap_full_checkpoint_matches_hooks(tiny_model, cases):
    sd, updates = wrapped_full_checkpoint(tiny_model, seed=4)
    assert has_lora_wrappers(sd)
    plain = unwrap_lora_state_dict(sd, LoraOptions(rank=None, alpha=ALPHA, config=None))
    assert not has_lora_wrappers(plain) and not any("lora" in k or "original_layer" in k for k in plain)
    model = copy.deepcopy(tiny_model)
    model.load_state_dict(meta_to_hf_state_dict(plain), strict=True)
    with lora_hooks(tiny_model, updates):
        ref = [_forward(tiny_model, c) for c in cases]
    _assert_parity(
        "full checkpoint with LoRA wrappers (PyTorch unwrapped vs hooks)",
        [_forward(model, c) for c in cases],
        ref,
        1e-4,
    )


def test_unwrap_needs_alpha(tiny_model):
    sd, _ = wrapped_full_checkpoint(tiny_model, seed=4)
    with pytest.raises(LoraError, match="alpha"):
        unwrap_lora_state_dict(sd, LoraOptions(rank=None, alpha=None, config=None))
    with pytest.raises(LoraError, match=r"blocks\.1\.mlp\.fc1\.lora\.lora_A.*\(32, 4\).*rank 4.*rank is 8"):
        unwrap_lora_state_dict(sd, LoraOptions(rank=8, alpha=ALPHA, config=None))


@pytest.mark.parametrize(
    "section", [{"rank": 4, "alpha": 8}, {"r": 4, "lora_alpha": 8}], ids=["rank-alpha", "r-lora_alpha"]
)
def test_training_yaml_gives_alpha(tiny_model, meta_adapter, tmp_path, section):
    import yaml

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1}, "lora": {**section, "dropout": 0.1}}))
    by_yaml, infos = merge_adapters(
        copy.deepcopy(tiny_model), [str(meta_adapter[0])], LoraOptions(None, None, str(config)), "hf"
    )
    by_flag, _ = merge_adapters(
        copy.deepcopy(tiny_model), [str(meta_adapter[0])], LoraOptions(None, ALPHA, None), "hf"
    )
    for (name, a), b in zip(by_yaml.state_dict().items(), by_flag.state_dict().values()):
        assert torch.equal(a, b), name
    assert infos[0]["hyperparameter_sources"]["alpha"] == "--lora-config train.yaml"


def test_stacked_adapters_apply_in_order(tiny_model, meta_adapter, peft_state_dict_adapter, cases):
    updates = meta_adapter[2] + peft_state_dict_adapter[2]
    with lora_hooks(tiny_model, updates):
        ref = [_forward(tiny_model, c) for c in cases[:2]]
    model, infos = merge_adapters(
        copy.deepcopy(tiny_model),
        [str(meta_adapter[0]), str(peft_state_dict_adapter[0])],
        LoraOptions(None, ALPHA, None),
        "hf",
    )
    _assert_parity(
        "stacked meta-lora + peft-state-dict (PyTorch)", [_forward(model, c) for c in cases[:2]], ref, 1e-4
    )
    assert [i["format"] for i in infos] == ["meta-lora", "peft-state-dict"]
    # every entry records the hashes of the model before ANY adapter
    assert infos[0]["base_weights_sha256"] == infos[1]["base_weights_sha256"]


# ----------------------------------------------------------------------------------------------
# Real CLI builds: ONNX Runtime vs the unmerged reference
# ----------------------------------------------------------------------------------------------
def test_cli_peft_decoder_only_bundle(
    tiny_model, tiny_hf_checkpoint, tiny_bundle, peft_decoder_adapter, cases, tmp_path, capsys
):
    directory, unmerged = peft_decoder_adapter
    out = tmp_path / "peft-decoder"
    code = _cli_build(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(directory), "--name", "tiny-peft"], out
    )
    assert code == 0
    got = _ort_outputs(out, cases)
    ref = [_forward(unmerged.get_base_model(), c) for c in cases]
    with capsys.disabled():  # the figures are worth seeing in the log
        parity = _assert_parity("peft directory (ORT merged bundle vs PEFT unmerged)", got, ref)
        _assert_differs("peft", got, [_forward(tiny_model, c) for c in cases], parity)

    manifest, base = Bundle(out).manifest, Bundle(tiny_bundle).manifest
    (lora,) = manifest.source.loras
    assert lora["format"] == "peft" and lora["path"] == directory.name and lora["parts"] == ["decoder"]
    assert lora["merged_weights"] == len(PEFT_DECODER_TARGETS) and lora["use_rslora"] is True
    assert lora["base_weights_sha256"] == {p: base.part(p).weights_sha256 for p in PARTS}
    for part in ("image_encoder", "text_encoder"):  # shareable with the base bundle's engines/cache
        assert manifest.part(part).weights_sha256 == base.part(part).weights_sha256
    assert manifest.part("decoder").weights_sha256 != base.part("decoder").weights_sha256
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "encoders identical to the base model: image_encoder, text_encoder" in capsys.readouterr().out


def test_cli_meta_checkpoint_with_stacked_adapters(
    tiny_model, meta_adapter, peft_state_dict_adapter, lora_yaml, cases, tmp_path, capsys
):
    """Meta trainer checkpoint still holding LoRA wrappers (merged on load, alpha from the YAML)
    + SAM3-LoRA .pt (MHA in_proj) + PEFT state dict, stacked."""
    wrapped, wrapped_updates = wrapped_full_checkpoint(tiny_model, seed=4)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": wrapped, "epoch": 7}, checkpoint)
    out = tmp_path / "meta-stacked"
    adapters = ["--lora", str(meta_adapter[0]), "--lora", str(peft_state_dict_adapter[0])]
    code = _cli_build(
        ["--checkpoint", str(checkpoint), "--config", "tiny", *adapters, "--lora-config", str(lora_yaml)], out
    )
    assert code == 0, capsys.readouterr().err
    got = _ort_outputs(out, cases)
    with lora_hooks(tiny_model, wrapped_updates + meta_adapter[2] + peft_state_dict_adapter[2]):
        ref = [_forward(tiny_model, c) for c in cases]
    with lora_hooks(tiny_model, wrapped_updates):
        base = [_forward(tiny_model, c) for c in cases]
    plain = [_forward(tiny_model, c) for c in cases]
    with capsys.disabled():
        parity = _assert_parity(
            "meta ckpt w/ wrappers + meta-lora + peft-state-dict (ORT vs hooks)", got, ref
        )
        _assert_differs("stacked adapters vs their base checkpoint", got, base, parity)
        _assert_differs("unwrapped checkpoint vs plain base", base, plain, parity)

    manifest = Bundle(out).manifest
    first, second = manifest.source.loras
    assert manifest.source.format == "meta-trainer"
    assert (first["format"], second["format"]) == ("meta-lora", "peft-state-dict")
    assert first["hyperparameter_sources"] == {
        "rank": f"--lora-config {lora_yaml.name}",
        "alpha": f"--lora-config {lora_yaml.name}",
    }
    assert second["alpha"] == 4.0  # the file's own lora_config wins over the YAML
    for part in PARTS:  # text/vision adapters change every part's weights
        assert manifest.part(part).weights_sha256 != first["base_weights_sha256"][part]
    assert main(["inspect", str(out)]) == 0
    assert "encoders identical to the base model: none" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Bad adapters: non-zero exit, the key/shape named, nothing written
# ----------------------------------------------------------------------------------------------
def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def test_error_wrong_rank(tiny_hf_checkpoint, meta_adapter, tmp_path, capsys):
    msg = _cli_fails(
        [
            "--checkpoint",
            str(tiny_hf_checkpoint),
            "--lora",
            str(meta_adapter[0]),
            "--lora-rank",
            "8",
            "--lora-alpha",
            "16",
        ],
        tmp_path / "out",
        capsys,
    )
    assert "lora.lora_A has shape (" in msg and "rank 4" in msg and "rank is 8 (--lora-rank)" in msg, msg


def test_error_missing_alpha(tiny_hf_checkpoint, meta_adapter, tmp_path, capsys):
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(meta_adapter[0])], tmp_path / "out", capsys
    )
    assert "LoRA alpha unknown" in msg and "--lora-alpha" in msg, msg


def test_error_key_matching_nothing(tiny_hf_checkpoint, meta_adapter, tmp_path, capsys):
    sd = dict(meta_adapter[1])
    sd["transformer.decoder.layers.0.no_such_proj.lora.lora_A"] = torch.zeros(32, RANK)
    sd["transformer.decoder.layers.0.no_such_proj.lora.lora_B"] = torch.zeros(RANK, 32)
    path = _save(tmp_path / "extra.pt", sd)
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(path), "--lora-alpha", "8"],
        tmp_path / "out",
        capsys,
    )
    assert "transformer.decoder.layers.0.no_such_proj.lora.lora_A matches no weight" in msg, msg


def test_error_shape_mismatch(tiny_hf_checkpoint, meta_adapter, tmp_path, capsys):
    sd = dict(meta_adapter[1])
    sd["transformer.decoder.layers.1.linear1.lora.lora_A"] = torch.zeros(48, RANK)  # the layer takes 32
    path = _save(tmp_path / "shape.pt", sd)
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(path), "--lora-alpha", "8"],
        tmp_path / "out",
        capsys,
    )
    assert "transformer.decoder.layers.1.linear1.lora.lora_A (48, 4)" in msg and "(64, 32)" in msg, msg


@pytest.mark.parametrize("damage", ["truncated-pt", "garbage-pt", "truncated-peft"])
def test_error_corrupted_file(
    tiny_hf_checkpoint, meta_adapter, peft_decoder_adapter, tmp_path, capsys, damage
):
    if damage == "truncated-peft":
        target = tmp_path / "peft"
        target.mkdir()
        for f in peft_decoder_adapter[0].iterdir():
            data = f.read_bytes()
            (target / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
        needle = "cannot read peft/adapter_model.safetensors"
    else:
        target = tmp_path / "adapter.pt"
        data = meta_adapter[0].read_bytes()
        target.write_bytes(data[: len(data) // 2] if damage == "truncated-pt" else b"not a torch file\n" * 64)
        needle = "cannot read adapter.pt"
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(target), "--lora-alpha", "8"],
        tmp_path / "out",
        capsys,
    )
    assert needle in msg, msg


def test_error_adapter_for_another_architecture(tiny_hf_checkpoint, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    )
    get_peft_model(bert, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])).save_pretrained(
        tmp_path / "bert"
    )
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(tmp_path / "bert")], tmp_path / "out", capsys
    )
    assert "encoder.layer.0.attention.self.query" in msg and "another architecture" in msg, msg


def test_error_peft_key_that_peft_would_ignore(tiny_hf_checkpoint, peft_decoder_adapter, tmp_path, capsys):
    """A key for a real Sam3Model module outside target_modules: PEFT drops it silently, we do not."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / "peft"
    target.mkdir()
    for f in peft_decoder_adapter[0].iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    sd = load_file(str(target / "adapter_model.safetensors"))
    extra = "base_model.model.detr_decoder.layers.1.mlp.fc1.lora_A.weight"
    sd[extra] = torch.ones(RANK, 32)
    sd[extra.replace("lora_A", "lora_B")] = torch.ones(64, RANK)
    save_file(sd, str(target / "adapter_model.safetensors"))
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(target)], tmp_path / "out", capsys
    )
    assert extra in msg and "matched nothing" in msg, msg


@pytest.mark.parametrize("kind", ["unknown-keys", "no-adapter-config", "wrapped-checkpoint"])
def test_error_not_an_adapter(tiny_model, tiny_hf_checkpoint, tmp_path, capsys, kind):
    if kind == "unknown-keys":
        path, needle = (
            _save(tmp_path / "weights.pt", {"encoder.weight": torch.zeros(2, 2)}),
            "unknown adapter format",
        )
    elif kind == "no-adapter-config":
        path, needle = tmp_path / "some_dir", "without adapter_config.json"
        path.mkdir()
    else:
        path = _save(tmp_path / "full.pt", {"model": wrapped_full_checkpoint(tiny_model, seed=4)[0]})
        needle = "pass it as --checkpoint"
    msg = _cli_fails(
        ["--checkpoint", str(tiny_hf_checkpoint), "--lora", str(path), "--lora-alpha", "8"],
        tmp_path / "out",
        capsys,
    )
    assert needle in msg, msg
