"""Batch requests through the ONNX encoders and split the results per request.

Used by the python ``vision_encoder`` and ``audio_encoder`` models (ONNX on
onnxruntime in the cpu profile, PyTorch on the GPU in gpu-hf and gpu-vllm), and by
the tests as the in-process reference path.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmtriton.encoders.onnx_runtime import OnnxEncoder


def load_encoder(version_dir: Path, model_name: str, params: dict[str, str]) -> Any:
    """The encoder a rendered model folder asks for (its config's ``runtime`` and ``device``).

    Args:
        version_dir: The model's ``1/`` folder.
        model_name: ``vision_encoder`` or ``audio_encoder``.
        params: The config's ``parameters`` as strings.

    Returns:
        An :class:`OnnxEncoder` (``runtime=onnxruntime``: ``1/model.onnx``) or a
        :class:`mmtriton.encoders.torch_runtime.TorchEncoder` (``runtime=torch``: ``1/model.safetensors``).
    """
    if params["runtime"] == "torch":
        from mmtriton.encoders.torch_runtime import TorchEncoder

        info = json.loads((version_dir / "encoder.json").read_text())
        return TorchEncoder(
            model_name, version_dir / "model.safetensors", info["spec"], info["llm_hidden_size"], params["device"]
        )
    return OnnxEncoder(version_dir / "model.onnx")


def encode_images(encoder: OnnxEncoder, pixel_values: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run one batch of preprocessed images.

    Args:
        encoder: The vision encoder (input ``pixel_values``, output ``embeddings``).
        pixel_values: Per request ``[3, S, S]`` or ``[1, 3, S, S]``, any float dtype.

    Returns:
        Per request FP16 embeddings ``[tokens, hidden]``.
    """
    batch = np.stack([np.asarray(p, dtype=np.float32).reshape(np.shape(p)[-3:]) for p in pixel_values])
    embeddings = encoder.run(pixel_values=batch)["embeddings"]
    return [row.astype(np.float16) for row in embeddings]


def encode_audio(
    encoder: OnnxEncoder, features: Sequence[np.ndarray], lengths: Sequence[int]
) -> list[np.ndarray]:
    """Pad requests of different lengths into one batch, run it, and trim each result.

    Args:
        encoder: The audio encoder (inputs ``features``, ``lengths``; outputs
            ``embeddings``, ``out_lengths``).
        features: Per request MFCC frames ``[T, n_mfcc]`` (a leading batch dim of 1 is allowed).
        lengths: Valid frames per request.

    Returns:
        Per request FP16 embeddings ``[tokens, hidden]``, holding only its valid rows.
    """
    rows = [np.asarray(f, dtype=np.float32).reshape(-1, np.shape(f)[-1]) for f in features]
    longest = max(int(n) for n in lengths)
    batch = np.zeros((len(rows), longest, rows[0].shape[1]), dtype=np.float32)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        batch[i, : int(n)] = row[: int(n)]
    out = encoder.run(features=batch, lengths=np.asarray(lengths, dtype=np.int64))
    return [emb[: int(n)].astype(np.float16) for emb, n in zip(out["embeddings"], out["out_lengths"])]
