"""torch.onnx export of the three parts (dynamo exporter, opset 18, dynamic batch only).

Measured while planning (transformers 5.23, torch 2.13 CPU): the dynamo exporter gives clean
graphs, while TorchScript export adds ``If``, ``Mod`` and hundreds of int64 shape ops that
TensorRT must then fold. Examples use batch 2 because a batch-1 example lets the exporter
specialise the batch axis to the constant 1.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from engines.bundle import BATCH, PartSpec, TensorSpec, TensorNames as T
from export.model_config import kept_fpn_sizes
from export.tokenizer import CONTEXT_LENGTH

OPSET = 18
EXAMPLE_BATCH = 2
_TWO_GB = 2 * 1024**3

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartInputs:
    """Example inputs and which of them carry the dynamic batch axis.

    ``varargs``: the wrapper's ``forward`` takes them as ``*inputs`` (the decoder: its number of
    FPN levels follows the config), so torch.export wants their shapes as one nested tuple.
    """

    args: tuple[torch.Tensor, ...]
    batched: tuple[bool, ...]
    varargs: bool = False


def example_inputs(part: str, model, *, seed: int = 0, max_boxes: int = 16) -> PartInputs:
    """Deterministic example inputs for one part, shaped from the model config.

    ``max_boxes``: the exemplar graphs' fixed box count K (fewer boxes are padding, label -10).
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    hidden = config.detr_encoder_config.hidden_size
    context = CONTEXT_LENGTH  # what the tokenizer feeds (export/model_config.py checks the text model has it)
    b = EXAMPLE_BATCH
    if part == "image_encoder":
        return PartInputs((torch.randn(b, 3, size, size, generator=generator),), (True,))
    if part == "text_encoder":
        ids = torch.randint(1, config.text_config.vocab_size - 2, (b, context), generator=generator, dtype=torch.int32)
        mask = torch.ones(b, context, dtype=torch.int32)
        mask[0, context // 2:] = 0
        return PartInputs((ids, mask), (True, True))
    if part == "decoder":
        levels = tuple(torch.randn(1, hidden, h, w, generator=generator) for h, w in kept_fpn_sizes(config))
        cls = torch.randn(1, 1, hidden, generator=generator)
        text = torch.randn(b, context, hidden, generator=generator)
        mask = torch.ones(b, context, dtype=torch.int32)
        mask[0, 5:] = 0
        return PartInputs((*levels, cls, text, mask), (False,) * (len(levels) + 1) + (True, True), varargs=True)
    if part == "geometry_encoder":
        height, width = kept_fpn_sizes(config)[-1]
        level = torch.randn(1, hidden, height, width, generator=generator)
        centre = 0.25 + 0.5 * torch.rand(b, max_boxes, 2, generator=generator)
        boxes = torch.cat([centre, 0.4 * torch.rand(b, max_boxes, 2, generator=generator) + 0.05], dim=-1)
        labels = torch.ones(b, max_boxes, dtype=torch.int32)
        labels[0, 1:] = -10
        labels[1, -1] = 0
        return PartInputs((level, boxes, labels), (False, True, True))
    if part == "exemplar_decoder":
        levels = tuple(torch.randn(1, hidden, h, w, generator=generator) for h, w in kept_fpn_sizes(config))
        text = torch.randn(b, context, hidden, generator=generator)
        mask = torch.ones(b, context, dtype=torch.int32)
        mask[0, 5:] = 0
        geometry = torch.randn(b, max_boxes + 1, hidden, generator=generator)
        geometry_mask = torch.ones(b, max_boxes + 1, dtype=torch.int32)
        geometry_mask[0, 1:-1] = 0
        return PartInputs((*levels, text, mask, geometry, geometry_mask),
                          (False,) * len(levels) + (True,) * 4, varargs=True)
    raise ValueError(f"unknown part {part!r}")


def export_part(part: str, module: nn.Module, inputs: PartInputs, path: Path) -> None:
    """Export ``module`` to ``path`` (plus ``path.data`` when over 2 GB)."""
    batch = torch.export.Dim("batch", min=1, max=64)
    dynamic_shapes: tuple = tuple({0: batch} if batched else None for batched in inputs.batched)
    if inputs.varargs:
        dynamic_shapes = (dynamic_shapes,)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            inputs.args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(module.input_names),
            output_names=list(module.output_names),
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    _rename_batch_dims(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = proto.ByteSize() > _TWO_GB or sum(t.raw_data.__len__() for t in proto.graph.initializer) > _TWO_GB
    if large:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _rename_batch_dims(proto: onnx.ModelProto) -> None:
    """Name every symbolic graph I/O dim ``batch`` (the exporter names it ``s0``/``batch``)."""
    for value in list(proto.graph.input) + list(proto.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = BATCH


_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool",
}


def tensor_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Inputs and outputs as the exported graph declares them (the manifest copies these)."""
    proto = onnx.load(str(path), load_external_data=False)

    def spec(value: onnx.ValueInfoProto) -> TensorSpec:
        tensor_type = value.type.tensor_type
        shape = tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in tensor_type.shape.dim)
        return TensorSpec(name=value.name, dtype=_DTYPES[tensor_type.elem_type], shape=shape)

    return tuple(spec(v) for v in proto.graph.input), tuple(spec(v) for v in proto.graph.output)


def external_data_files(path: Path) -> tuple[str, ...]:
    data = path.with_name(f"{path.name}.data")
    return (data.name,) if data.exists() else ()


def check_contract(part: PartSpec, fpn: tuple[str, ...] = T.FPN) -> None:
    """The exported I/O must be what the runtime expects: names from TensorNames (``fpn``: the
    model's FPN level names), batch axes."""
    expected = {
        "image_encoder": ((T.PIXEL_VALUES,), (*fpn, T.GEOMETRY_CLS)),
        "text_encoder": ((T.INPUT_IDS, T.ATTENTION_MASK), (T.TEXT_FEATURES,)),
        "decoder": ((*fpn, T.GEOMETRY_CLS, T.TEXT_FEATURES, T.TEXT_MASK),
                    (T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS, T.PRESENCE_LOGITS)),
        "geometry_encoder": ((fpn[-1], T.INPUT_BOXES, T.INPUT_BOXES_LABELS), (T.GEOMETRY_FEATURES, T.GEOMETRY_MASK)),
        "exemplar_decoder": ((*fpn, T.TEXT_FEATURES, T.TEXT_MASK, T.GEOMETRY_FEATURES, T.GEOMETRY_MASK),
                             (T.PRED_MASKS, T.PRED_BOXES, T.PRED_LOGITS, T.PRESENCE_LOGITS)),
    }[part.name]
    if (part.input_names, part.output_names) != expected:
        raise RuntimeError(f"{part.name}: exported I/O {part.input_names} -> {part.output_names}, expected {expected}")
    for spec in part.outputs:
        if not spec.has_batch:
            raise RuntimeError(f"{part.name}: output {spec.name} lost its batch axis: {spec.shape}")
