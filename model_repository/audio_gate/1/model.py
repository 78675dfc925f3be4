"""audio_gate: forwards ``audio`` unchanged once ``after`` (the image embeddings) exists."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.stub_watchdog import exit_with_parent


class TritonPythonModel:
    """One response per request, the audio bytes as they came."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()

    def execute(self, requests: list) -> list:
        # The bytes are copied: an output that is a view of an input keeps the stub's
        # shared-memory input alive, and with large payloads that held the whole ensemble
        # request (the model never unloaded, the server's memory grew with every request).
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("audio_out", np.array(pb_utils.get_input_tensor_by_name(r, "audio").as_numpy(), copy=True))]
            )
            for r in requests
        ]
