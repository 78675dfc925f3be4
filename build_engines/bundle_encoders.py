"""The bundle's encoders: random-weight vision and audio encoders exported to ONNX (checked against PyTorch), or given ONNX files copied in.

Each exported encoder also keeps its weights as ``model.safetensors`` (the gpu-hf and
gpu-vllm profiles run them in PyTorch). Graph names: :mod:`build_engines.encoder_io`.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.torch import save_file

from build_engines.bundle_manifest import BundleError
from build_engines.encoder_io import AUDIO_IO, VISION_IO, EncoderIO, onnx_io
from mmtriton.encoders.modules import AudioEncoder, VisionEncoder
from mmtriton.encoders.onnx_runtime import OnnxEncoder
from mmtriton.spec import ModelSpec

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
PARITY_RTOL = 1e-3


def _copy_onnx(source: Path, out_dir: Path, expected: EncoderIO) -> None:
    """Copy an ONNX encoder (and its external data files) after checking its I/O names."""
    if not source.is_file():
        raise BundleError(f"encoder ONNX file {source} does not exist")
    model = onnx.load(str(source), load_external_data=False)
    found = onnx_io(model)
    if found != expected:
        raise BundleError(
            f"{source}: inputs {list(found.inputs)} / outputs {list(found.outputs)}, "
            f"expected {list(expected.inputs)} / {list(expected.outputs)}"
        )
    out_dir.mkdir(parents=True)
    shutil.copyfile(source, out_dir / "model.onnx")
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    for location in sorted(locations):
        shutil.copyfile(source.parent / location, out_dir / location)


def _save_weights(module: torch.nn.Module, path: Path) -> None:
    """Write a module's weights as safetensors (the PyTorch runtimes of the GPU profiles load them)."""
    tensors = {name: t.detach().contiguous() for name, t in module.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def _export(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    io: EncoderIO,
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Export a module to ONNX with the TorchScript exporter, graph names from ``io``."""
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo and warns
        # about traced shape arithmetic; both are expected here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=list(io.inputs),
            output_names=list(io.outputs),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _pin_output_dim(path: Path, output: str, axis: int, size: int) -> None:
    """Fix one axis of a graph output to ``size`` and check the model again."""
    model = onnx.load(str(path))
    (value,) = [o for o in model.graph.output if o.name == output]
    value.type.tensor_type.shape.dim[axis].dim_value = size
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _check_parity(name: str, expected: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    """Refuse ONNX outputs that differ from PyTorch's (integers exactly, floats within :data:`PARITY_RTOL`)."""
    for key, want in expected.items():
        have = got[key]
        if have.shape != want.shape:
            raise BundleError(f"{name} ONNX output {key!r} has shape {have.shape}, PyTorch {want.shape}")
        if np.issubdtype(want.dtype, np.integer):
            if not np.array_equal(have, want):
                raise BundleError(f"{name} ONNX output {key!r} differs from PyTorch: {have} vs {want}")
            continue
        error = relative_error(have, want)
        if error > PARITY_RTOL:
            raise BundleError(f"{name} ONNX output {key!r} relative error {error:.2e} exceeds {PARITY_RTOL:.0e}")
        logger.info("%s ONNX parity %r: relative error %.2e", name, key, error)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """``max|actual - expected| / max|expected|`` (0 when both are all zero).

    Args:
        actual: The values checked.
        expected: The reference values.

    Returns:
        The relative error (the absolute one when ``expected`` is all zero).
    """
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    diff = float(np.max(np.abs(actual.astype(np.float64) - expected))) if expected.size else 0.0
    return diff / scale if scale else diff


def build_vision(spec: ModelSpec, out_dir: Path, llm_hidden: int) -> None:
    """Write ``vision_encoder/``: the spec's ONNX file copied in, or a random ViT exported and checked.

    Args:
        spec: The model spec (``vision`` and ``seed``).
        out_dir: The bundle's ``vision_encoder`` folder (must not exist yet).
        llm_hidden: The LLM's hidden size (the embeddings' width).

    Raises:
        BundleError: The given ONNX file has other graph names, or the export disagrees with PyTorch.
    """
    if spec.vision.onnx:
        _copy_onnx(Path(spec.vision.onnx), out_dir, VISION_IO)
        return
    out_dir.mkdir(parents=True)
    size = spec.vision.image_size
    model = VisionEncoder(spec.vision, llm_hidden, generator=torch.Generator().manual_seed(spec.seed + 1)).eval()
    _save_weights(model, out_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(spec.seed + 11)
    pixels = torch.randn(2, 3, size, size, generator=gen)
    dynamic_axes = {"pixel_values": {0: "batch"}, "embeddings": {0: "batch"}}
    _export(model, (pixels,), out_dir / "model.onnx", VISION_IO, dynamic_axes)
    # The exporter names the token axis symbolically because the attention
    # reshapes read it from the input shape; it is fixed, so pin it.
    _pin_output_dim(out_dir / "model.onnx", "embeddings", 1, spec.vision.tokens_per_image)
    with torch.no_grad():
        want = model(pixels).numpy()
    got = OnnxEncoder(out_dir / "model.onnx").run(pixel_values=pixels.numpy())
    _check_parity("vision", {"embeddings": want}, got)


def build_audio(spec: ModelSpec, out_dir: Path, llm_hidden: int) -> None:
    """Write ``audio_encoder/``: the spec's ONNX file copied in, or a random encoder exported and checked.

    Args:
        spec: The model spec (``audio`` and ``seed``).
        out_dir: The bundle's ``audio_encoder`` folder (must not exist yet).
        llm_hidden: The LLM's hidden size (the embeddings' width).

    Raises:
        BundleError: The given ONNX file has other graph names, or the export disagrees with PyTorch.
    """
    if spec.audio.onnx:
        _copy_onnx(Path(spec.audio.onnx), out_dir, AUDIO_IO)
        return
    out_dir.mkdir(parents=True)
    model = AudioEncoder(spec.audio, llm_hidden, generator=torch.Generator().manual_seed(spec.seed + 2)).eval()
    _save_weights(model, out_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(spec.seed + 12)
    features = torch.randn(3, 50, spec.audio.n_mfcc, generator=gen)
    lengths = torch.tensor([50, 31, 7], dtype=torch.int64)
    _export(
        model,
        (features, lengths),
        out_dir / "model.onnx",
        AUDIO_IO,
        {
            "features": {0: "batch", 1: "frames"},
            "lengths": {0: "batch"},
            "embeddings": {0: "batch", 1: "tokens"},
            "out_lengths": {0: "batch"},
        },
    )
    # Check on a shape other than the traced one, so a shape baked in at export shows up.
    check_features = torch.randn(4, 77, spec.audio.n_mfcc, generator=gen)
    check_lengths = torch.tensor([77, 60, 13, 1], dtype=torch.int64)
    with torch.no_grad():
        embeddings, out_lengths = model(check_features, check_lengths)
    got = OnnxEncoder(out_dir / "model.onnx").run(features=check_features.numpy(), lengths=check_lengths.numpy())
    _check_parity("audio", {"embeddings": embeddings.numpy(), "out_lengths": out_lengths.numpy()}, got)
