"""CPU-profile vision_encoder: the bundle's ONNX encoder on onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.encoding import encode_images
from mmtriton.onnx_runtime import OnnxEncoder


class TritonPythonModel:
    """Runs every request of a dynamic batch through one onnxruntime call."""

    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.encoder = OnnxEncoder(version_dir / "model.onnx")

    def execute(self, requests: list) -> list:
        pixels = [pb_utils.get_input_tensor_by_name(r, "pixel_values").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("embeddings", np.ascontiguousarray(emb)[None])])
            for emb in encode_images(self.encoder, pixels)
        ]
