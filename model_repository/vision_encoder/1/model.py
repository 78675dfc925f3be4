"""vision_encoder on the python backend: the bundle's ONNX file on onnxruntime (CPU), or its weights in PyTorch (GPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.encoding import encode_images
from mmtriton.onnx_runtime import OnnxEncoder


class TritonPythonModel:
    """Runs every request of a dynamic batch through one onnxruntime call."""

    def initialize(self, args: dict) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        if params["runtime"] == "torch":
            from mmtriton.torch_runtime import TorchEncoder

            info = json.loads((version_dir / "encoder.json").read_text())
            self.encoder = TorchEncoder(
                args["model_name"], version_dir / "model.safetensors", info["spec"], info["llm_hidden_size"], params["device"]
            )
        else:
            self.encoder = OnnxEncoder(version_dir / "model.onnx")

    def execute(self, requests: list) -> list:
        pixels = [pb_utils.get_input_tensor_by_name(r, "pixel_values").as_numpy() for r in requests]
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("embeddings", np.ascontiguousarray(emb)[None])])
            for emb in encode_images(self.encoder, pixels)
        ]
