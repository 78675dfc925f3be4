"""Thin typed wrapper over an onnxruntime session with named inputs and outputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["OnnxEncoder"]


class OnnxEncoder:
    """An ONNX encoder run through onnxruntime.

    Args:
        path: The ``.onnx`` file.
        providers: Execution providers in priority order; defaults to CPU only.
        intra_op_threads: Threads per operator; 0 lets onnxruntime choose.

    Attributes:
        input_names: Graph input names, in graph order.
        output_names: Graph output names, in graph order.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
    ) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_names: tuple[str, ...] = tuple(i.name for i in self.session.get_inputs())
        self.output_names: tuple[str, ...] = tuple(o.name for o in self.session.get_outputs())

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Run the graph.

        Args:
            **inputs: One array per graph input, by name.

        Returns:
            Every graph output, by name.

        Raises:
            ValueError: An input is missing or not a graph input.
        """
        if set(inputs) != set(self.input_names):
            raise ValueError(f"expected inputs {sorted(self.input_names)}, got {sorted(inputs)}")
        feeds = {name: np.ascontiguousarray(value) for name, value in inputs.items()}
        outputs = self.session.run(list(self.output_names), feeds)
        return dict(zip(self.output_names, outputs, strict=True))
