"""Test helpers: SAM3 models assembled from Meta's own ``sam3`` package (the independent reference).

Why this exists: ``sam3.model_builder`` hard-codes the published dims (1008 px, ViT 1024x32, ...),
so small reference models are assembled here from the same classes with the same wiring as
``model_builder._create_*`` (the way SAM3-Small builders do). Everything runs on CPU through
:func:`cpu_shim`, because the PyPI ``sam3`` 0.1.4 wheel hard-codes CUDA in a few places.

Only tests import this module; it needs ``sam3`` (+ ``psutil``, which ``sam3`` imports undeclared).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode


# ----------------------------------------------------------------------------------------------
# CPU shim
# ----------------------------------------------------------------------------------------------
class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device="cuda"`` in factory calls to the ambient default device.

    sam3 0.1.4 calls ``torch.zeros(..., device="cuda")`` (PositionEmbeddingSine precompute) and
    ``torch.arange(..., device="cuda")`` (TransformerDecoder coordinate cache) in constructors.
    """

    def __init__(self, target: torch.device):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs["device"] = self.target
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_shim(target: torch.device | str = "cpu") -> Iterator[None]:
    """Run Meta's sam3 code without CUDA: cuda factory calls -> ``target``, pin_memory -> no-op.

    ``pin_memory`` is called unconditionally by the geometry encoder's box pooling
    (geometry_encoders.py, even with zero boxes) and raises on a CUDA-less machine.
    """
    original_pin = torch.Tensor.pin_memory
    torch.Tensor.pin_memory = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        with _CudaToCpu(torch.device(target)):
            yield
    finally:
        torch.Tensor.pin_memory = original_pin  # type: ignore[method-assign]


class _IdsTokenizer:
    """Stands in for Meta's SimpleTokenizer: returns preset token ids (no BPE vocab needed).

    Meta's VETextEncoder tokenizes inside ``forward``; feeding ids directly keeps the reference
    independent of any vocab file (the PyPI wheel ships none).
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None

    def __call__(self, texts, context_length: int = 32) -> torch.Tensor:
        assert self.ids is not None, "set tokenizer.ids before calling the text encoder"
        assert self.ids.shape == (len(texts), context_length), (self.ids.shape, len(texts))
        return self.ids


# ----------------------------------------------------------------------------------------------
# Small model builder (mirrors sam3.model_builder._create_* with dims as arguments)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MetaDims:
    """Dims of a Meta SAM3 image model; defaults = the repo's ``tiny`` preset."""

    image_size: int = 112
    pretrain_image_size: int = 56
    patch_size: int = 14
    vit_width: int = 32
    vit_depth: int = 2
    vit_heads: int = 2
    vit_mlp_ratio: float = 2.0
    window_size: int = 4
    global_blocks: tuple[int, ...] = (1,)
    text_width: int = 32
    text_heads: int = 2
    text_layers: int = 2
    d_model: int = 32
    heads: int = 2
    ffn: int = 64
    encoder_layers: int = 1
    decoder_layers: int = 2
    geometry_layers: int = 1
    num_queries: int = 10
    extra: dict = field(default_factory=dict)

    @staticmethod
    def full() -> "MetaDims":
        """Meta's published dims (model_builder.py): 1008 px, ViT 1024x32, text 1024x24, d 256."""
        return MetaDims(
            image_size=1008, pretrain_image_size=336, vit_width=1024, vit_depth=32, vit_heads=16,
            vit_mlp_ratio=4.625, window_size=24, global_blocks=(7, 15, 23, 31), text_width=1024,
            text_heads=16, text_layers=24, d_model=256, heads=8, ffn=2048, encoder_layers=6,
            decoder_layers=6, geometry_layers=3, num_queries=200,
        )


def _mha(d: MetaDims, dropout: float = 0.1, batch_first: bool | None = None):
    from sam3.model.model_misc import MultiheadAttentionWrapper

    kw = {} if batch_first is None else {"batch_first": batch_first}
    return MultiheadAttentionWrapper(num_heads=d.heads, dropout=dropout, embed_dim=d.d_model, **kw)


def _vit(d: MetaDims):
    from sam3.model.vitdet import ViT

    return ViT(
        img_size=d.image_size, pretrain_img_size=d.pretrain_image_size, patch_size=d.patch_size,
        embed_dim=d.vit_width, depth=d.vit_depth, num_heads=d.vit_heads, mlp_ratio=d.vit_mlp_ratio,
        norm_layer="LayerNorm", drop_path_rate=0.0, qkv_bias=True, use_abs_pos=True,
        tile_abs_pos=True, global_att_blocks=d.global_blocks, rel_pos_blocks=(), use_rope=True,
        use_interp_rope=True, window_size=d.window_size, pretrain_use_cls_token=True,
        retain_cls_token=False, ln_pre=True, ln_post=False, return_interm_layers=False,
        bias_patch_embed=False, compile_mode=None,
    )


def _pos_enc(d: MetaDims, precompute: int | None):
    from sam3.model.position_encoding import PositionEmbeddingSine

    return PositionEmbeddingSine(
        num_pos_feats=d.d_model, normalize=True, scale=None, temperature=10000,
        precompute_resolution=precompute,
    )


def _backbone(d: MetaDims, tokenizer):
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.vl_combiner import SAM3VLBackbone

    neck = Sam3DualViTDetNeck(
        position_encoding=_pos_enc(d, d.image_size), d_model=d.d_model,
        scale_factors=[4.0, 2.0, 1.0, 0.5], trunk=_vit(d), add_sam2_neck=False,
    )
    text = VETextEncoder(
        tokenizer=tokenizer, d_model=d.d_model, width=d.text_width, heads=d.text_heads,
        layers=d.text_layers,
    )
    return SAM3VLBackbone(visual=neck, text=text, scalp=1)


def _transformer(d: MetaDims):
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.model_misc import TransformerWrapper

    enc_layer = TransformerEncoderLayer(
        activation="relu", d_model=d.d_model, dim_feedforward=d.ffn, dropout=0.1,
        pos_enc_at_attn=True, pos_enc_at_cross_attn_keys=False,
        pos_enc_at_cross_attn_queries=False, pre_norm=True,
        self_attention=_mha(d, batch_first=True), cross_attention=_mha(d, batch_first=True),
    )
    encoder = TransformerEncoderFusion(
        layer=enc_layer, num_layers=d.encoder_layers, d_model=d.d_model, num_feature_levels=1,
        frozen=False, use_act_checkpoint=False, add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    dec_layer = TransformerDecoderLayer(
        activation="relu", d_model=d.d_model, dim_feedforward=d.ffn, dropout=0.1,
        cross_attention=_mha(d), n_heads=d.heads, use_text_cross_attention=True,
    )
    decoder = TransformerDecoder(
        layer=dec_layer, num_layers=d.decoder_layers, num_queries=d.num_queries,
        return_intermediate=True, box_refine=True, num_o2m_queries=0, dac=True, boxRPB="log",
        d_model=d.d_model, frozen=False, interaction_layer=None, dac_use_selfatt_ln=True,
        resolution=d.image_size, stride=d.patch_size, use_act_checkpoint=False,
        presence_token=True,
    )
    return TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d.d_model)


def _scoring(d: MetaDims):
    from torch import nn

    from sam3.model.model_misc import MLP, DotProductScoring

    prompt_mlp = MLP(
        input_dim=d.d_model, hidden_dim=d.ffn, output_dim=d.d_model, num_layers=2, dropout=0.1,
        residual=True, out_norm=nn.LayerNorm(d.d_model),
    )
    return DotProductScoring(d_model=d.d_model, d_proj=d.d_model, prompt_mlp=prompt_mlp)


def _seg_head(d: MetaDims):
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead

    pixel_decoder = PixelDecoder(
        num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d.d_model,
        compile_mode=None,
    )
    return UniversalSegmentationHead(
        hidden_dim=d.d_model, upsampling_stages=3, aux_masks=False, presence_head=False,
        dot_product_scorer=None, act_ckpt=False, cross_attend_prompt=_mha(d, dropout=0),
        pixel_decoder=pixel_decoder,
    )


def _geometry_encoder(d: MetaDims):
    from sam3.model.encoder import TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder

    layer = TransformerEncoderLayer(
        activation="relu", d_model=d.d_model, dim_feedforward=d.ffn, dropout=0.1,
        pos_enc_at_attn=False, pre_norm=True, self_attention=_mha(d, batch_first=False),
        pos_enc_at_cross_attn_queries=False, pos_enc_at_cross_attn_keys=True,
        cross_attention=_mha(d, batch_first=False),
    )
    return SequenceGeometryEncoder(
        pos_enc=_pos_enc(d, None), encode_boxes_as_points=False, points_direct_project=True,
        points_pool=True, points_pos_enc=True, boxes_direct_project=True, boxes_pool=True,
        boxes_pos_enc=True, d_model=d.d_model, num_layers=d.geometry_layers, layer=layer,
        use_act_ckpt=False, add_cls=True, add_post_encode_proj=True,
    )


def _init_uninitialised(model: torch.nn.Module, seed: int) -> None:
    """Fill the two parameters Meta's builder leaves as ``torch.empty`` (NaN outputs otherwise)."""
    gen = torch.Generator().manual_seed(seed + 1)
    enc = model.backbone.language_backbone.encoder
    with torch.no_grad():
        enc.positional_embedding.copy_(torch.randn(enc.positional_embedding.shape, generator=gen) * 0.01)
        enc.text_projection.copy_(
            torch.randn(enc.text_projection.shape, generator=gen) * enc.width**-0.5
        )


def build_small_meta_model(dims: MetaDims = MetaDims(), seed: int = 0, device: str = "cpu"):
    """A Meta ``Sam3Image`` with ``dims``, seeded, eval mode (``device="meta"``: structure only)."""
    from sam3.model.sam3_image import Sam3Image

    torch.manual_seed(seed)
    tokenizer = _IdsTokenizer()
    with cpu_shim(device), torch.device(device):
        model = Sam3Image(
            backbone=_backbone(dims, tokenizer), transformer=_transformer(dims),
            input_geometry_encoder=_geometry_encoder(dims), segmentation_head=_seg_head(dims),
            num_feature_levels=1, o2m_mask_predict=True, dot_prod_scoring=_scoring(dims),
            use_instance_query=False, multimask_output=True, inst_interactive_predictor=None,
            matcher=None,
        )
    if device != "meta":
        _init_uninitialised(model, seed)
    return model.eval()


def build_full_meta_model_structure():
    """Meta's own ``build_sam3_image_model`` (published dims) on the meta device: keys, no RAM."""
    from sam3 import model_builder

    class _NoVocab:  # the wheel ships no BPE file; the structure does not depend on it
        def __init__(self, bpe_path=None, **_):
            pass

    original = model_builder.SimpleTokenizer
    model_builder.SimpleTokenizer = _NoVocab
    try:
        # Not ``torch.device("meta")``: the ViT calls ``.item()`` on a linspace in __init__.
        with cpu_shim("cpu"), parameters_on_meta():
            return model_builder.build_sam3_image_model(
                device="cpu", eval_mode=True, checkpoint_path=None, load_from_HF=False,
            )
    finally:
        model_builder.SimpleTokenizer = original


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside lands on the meta device (init_empty_weights-style).

    ``torch.empty`` on CPU reserves no pages and ``reset_parameters`` then runs on meta tensors,
    so a 848 M-parameter structure costs no real memory.
    """
    original = torch.nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None:
            kind = type(self._parameters[name])
            self._parameters[name] = kind(self._parameters[name].to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


# ----------------------------------------------------------------------------------------------
# Reference forward
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def meta_forward(model, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 boxes: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Meta's image->text-prompt path exactly as ``Sam3Processor.set_image/set_text_prompt`` runs it.

    ``pixel_values`` is already normalised ([-1, 1], mean/std 0.5); ``input_ids`` [B, 32] padded
    with 0 (Meta masks with ``tokens != 0``). The geometric prompt is Meta's dummy (zero boxes),
    which still yields one geometry-encoder CLS token; ``boxes`` [N,4] (normalised cxcywh) with
    ``labels`` [N] (True positive) are appended to it as ``Sam3Processor.add_geometric_prompt``
    does, one call per box (a box-only prompt's text is "visual" there). Returns pred_logits [B,Q],
    pred_boxes [B,Q,4] (cxcywh), pred_masks [B,Q,H,W], presence [B,1].
    """
    from sam3.model.data_misc import FindStage

    bsz = pixel_values.shape[0]
    assert bsz == 1, "Meta's image-processor path is batch 1 (img_ids/text_ids=[0])"
    tokenizer = model.backbone.language_backbone.tokenizer
    tokenizer.ids = input_ids
    with cpu_shim("cpu"):
        backbone_out = model.backbone.forward_image(pixel_values)
        backbone_out.update(model.backbone.forward_text(["<ids>"] * bsz, device="cpu"))
        find = FindStage(
            img_ids=torch.tensor([0]), text_ids=torch.tensor([0]), input_boxes=None,
            input_boxes_mask=None, input_boxes_label=None, input_points=None,
            input_points_mask=None,
        )
        prompt = model._get_dummy_prompt()
        for box, label in zip(boxes if boxes is not None else [], labels if labels is not None else []):
            prompt.append_boxes(box.view(1, 1, 4).float(), label.view(1, 1).bool())
        out = model.forward_grounding(
            backbone_out=backbone_out, find_input=find, find_target=None, geometric_prompt=prompt,
        )
    return {
        "pred_logits": out["pred_logits"].squeeze(-1),
        "pred_boxes": out["pred_boxes"],
        "pred_masks": out["pred_masks"],
        "presence": out["presence_logit_dec"].reshape(bsz, 1),
    }
