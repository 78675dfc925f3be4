"""audio_check: mmtriton.media.validation.check_audio on each payload; good ones pass through unchanged."""

from __future__ import annotations


import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import error_response, model_parameters
from mmtriton.backend.stub_watchdog import exit_with_parent
from mmtriton.contract import InputError
from mmtriton.media.validation import check_audio


class TritonPythonModel:
    """One INVALID_ARGUMENT response per bad payload; the others are forwarded as they came."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        params = model_parameters(args)
        self.limits = {
            "max_bytes": int(params["max_bytes"]),
            "max_seconds": float(params["max_seconds"]),
            "full_decode": params.get("full_decode", "false") == "true",
        }

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            payload = pb_utils.get_input_tensor_by_name(request, "audio").as_numpy().reshape(1, -1)
            try:
                check_audio(payload, name="audio", **self.limits)
            except InputError as err:
                responses.append(error_response(str(err)))
                continue
            # A copy, not a view of the input: see audio_gate/1/model.py (a view kept the request alive).
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("checked", np.array(payload, copy=True))]))
        return responses
