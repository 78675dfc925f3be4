"""The graph names of the bundle's exported encoders, and reading them back from an ONNX file.

The bundle's encoders (``build_engines/bundle_encoders.py`` writes them, see the layout in
``build_engines/bundle.py``) have these inputs and outputs, in graph order::

    vision_encoder/model.onnx   pixel_values -> embeddings
    audio_encoder/model.onnx    features, lengths -> embeddings, out_lengths

The bundle checks an ONNX file it is given against them, and the TensorRT-LLM build
plan checks the vision graph before it plans ``trtexec`` shapes for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EncoderIO:
    """Graph input and output names of an exported encoder, in graph order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


VISION_IO = EncoderIO(("pixel_values",), ("embeddings",))
AUDIO_IO = EncoderIO(("features", "lengths"), ("embeddings", "out_lengths"))


def onnx_io(model: Any) -> EncoderIO:
    """Input and output names of a loaded ``onnx.ModelProto``.

    Initializers listed as graph inputs (old exporters) are left out.

    Args:
        model: The loaded model (external data need not be loaded).

    Returns:
        Its graph's names, in graph order.
    """
    weights = {t.name for t in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in weights)
    return EncoderIO(inputs, tuple(o.name for o in model.graph.output))


def read_onnx_io(path: Path) -> EncoderIO | None:
    """Graph input/output names of an ONNX file, or None when it cannot be read here.

    Args:
        path: The ONNX file.

    Returns:
        Its names (see :func:`onnx_io`); None when the file is missing or ``onnx`` is not installed.
    """
    try:
        import onnx  # present in the image (TensorRT-LLM requirement) and in the CPU venv
    except ImportError:
        return None
    if not path.is_file():
        return None
    return onnx_io(onnx.load(str(path), load_external_data=False))
