"""The bundle's encoders in PyTorch, for GPUs where onnxruntime has no CUDA provider.

:class:`TorchEncoder` has the same ``run(**inputs) -> dict`` interface as
:class:`mmtriton.encoders.onnx_runtime.OnnxEncoder`, with the same input and output
names, so :mod:`mmtriton.encoders.batching` drives either. It rebuilds the module from
the bundle spec and loads ``model.safetensors`` (the weights the ONNX file was
exported from and checked against).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


class TorchEncoder:
    """One of the bundle's encoders on a torch device.

    Args:
        kind: ``vision_encoder`` or ``audio_encoder``.
        weights: The encoder's ``model.safetensors``.
        spec: The bundle spec as plain data (``bundle.json``'s ``spec``).
        llm_hidden: The LLM hidden size (projector output width).
        device: Torch device, e.g. ``cuda`` or ``cuda:0``.
        dtype: Compute dtype name (``float16``, ``bfloat16``, ``float32``).
    """

    def __init__(
        self, kind: str, weights: Path, spec: dict[str, Any], llm_hidden: int, device: str, dtype: str = "float16"
    ) -> None:
        import torch
        from safetensors.torch import load_file

        from mmtriton.spec import spec_from_dict
        from mmtriton.encoders.modules import AudioEncoder, VisionEncoder

        full = spec_from_dict(spec)
        module = VisionEncoder(full.vision, llm_hidden) if kind == "vision_encoder" else AudioEncoder(full.audio, llm_hidden)
        module.load_state_dict(load_file(str(weights)))
        self._torch = torch
        self.kind = kind
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.module = module.to(self.device, self.dtype).eval()

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; inputs and outputs are numpy arrays named as in the ONNX file."""
        torch = self._torch
        with torch.inference_mode():
            if self.kind == "vision_encoder":
                pixels = torch.from_numpy(inputs["pixel_values"]).to(self.device, self.dtype)
                return {"embeddings": self.module(pixels).float().cpu().numpy()}
            features = torch.from_numpy(inputs["features"]).to(self.device, self.dtype)
            lengths = torch.from_numpy(inputs["lengths"]).to(self.device)
            embeddings, out_lengths = self.module(features, lengths)
            return {"embeddings": embeddings.float().cpu().numpy(), "out_lengths": out_lengths.cpu().numpy()}
