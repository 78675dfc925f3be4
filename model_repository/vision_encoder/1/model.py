"""vision_encoder on the python backend: the bundle's ONNX file on onnxruntime (CPU), or its weights in PyTorch (GPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import model_parameters
from mmtriton.encoders.batching import encode_images, load_encoder
from mmtriton.backend.stub_watchdog import exit_with_parent


class TritonPythonModel:
    """Runs every request of a dynamic batch through one onnxruntime call."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = model_parameters(args)
        self.encoder = load_encoder(version_dir, args["model_name"], params)

    def execute(self, requests: list) -> list:
        pixels = [pb_utils.get_input_tensor_by_name(r, "pixel_values").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("embeddings", np.ascontiguousarray(emb)[None])])
            for emb in encode_images(self.encoder, pixels)
        ]
