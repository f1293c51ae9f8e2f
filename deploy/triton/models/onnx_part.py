"""Triton Python-backend model: one bundle part run by ONNX Runtime inside Triton.

Written as ``<prefix>_<part>/1/model.py`` (beside ``model.onnx``) by
``python -m export triton BUNDLE OUT --platform python``. It serves Triton builds that lack the
onnxruntime backend (PyTriton's wheel: the tests run a real Triton with it) and CPUs; on GPU
servers use ``--platform onnxruntime`` or ``tensorrt``, Triton's own backends.

With ``max_batch_size > 0`` Triton's dynamic batcher hands ``execute`` several requests at once:
their inputs are stacked on the batch axis and run as ONE session call, then split back, so
Triton's metrics count fewer executions than inferences exactly as its native backends do.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from sam3_tensors import error_response, input_array, to_tensor


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        here = Path(args["model_repository"]) / args["model_version"]
        parameters = {k: v.get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        self.name = config["name"]
        self.batched = int(config.get("max_batch_size", 0) or 0) > 0
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        threads = int(parameters.get("intra_op_thread_count", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Several sessions share few cores here: spinning pools fight (engines/onnxruntime.py).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(here / parameters.get("onnx_file", "model.onnx")), sess_options=options,
            providers=["CPUExecutionProvider"],
        )

    def execute(self, requests):
        feeds = []
        for request in requests:
            feeds.append({name: input_array(request, name) for name in self.inputs})
        try:
            if self.batched and len(feeds) > 1:
                sizes = [int(feed[self.inputs[0]].shape[0]) for feed in feeds]
                stacked = {name: np.concatenate([feed[name] for feed in feeds], axis=0) for name in self.inputs}
                merged = self.session.run(self.outputs, stacked)
                cuts = np.cumsum(sizes)[:-1]
                pieces = [np.split(value, cuts, axis=0) for value in merged]
                results = [[piece[i] for piece in pieces] for i in range(len(feeds))]
            else:
                results = [self.session.run(self.outputs, feed) for feed in feeds]
        except Exception as exc:  # noqa: BLE001 - reported to every caller of this batch
            message = f"{self.name}: onnxruntime failed: {exc}"
            return [error_response(message) for _ in requests]
        return [
            pb_utils.InferenceResponse([to_tensor(name, value) for name, value in zip(self.outputs, values)])
            for values in results
        ]

    def finalize(self):
        self.session = None
