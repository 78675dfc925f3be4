"""audio_preprocess on the python backend (cpu, gpu-hf, gpu-vllm): builds 1/dali.py on the device preprocess.json names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import error_response
from mmtriton.media.preprocess import AudioPreprocessor
from mmtriton.backend.stub_watchdog import exit_with_parent
from mmtriton.contract import InputError


class TritonPythonModel:
    """Checks each payload, then computes MFCC frames for the good ones as one DALI batch."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.preprocess = AudioPreprocessor(version_dir / "dali.py")

    def execute(self, requests: list) -> list:
        payloads = [pb_utils.get_input_tensor_by_name(r, "audio").as_numpy().reshape(-1) for r in requests]
        responses = []
        for result in self.preprocess(payloads):
            if isinstance(result, InputError):
                responses.append(error_response(str(result)))
                continue
            frames, length = result
            outputs = [
                pb_utils.Tensor("mfcc", np.ascontiguousarray(frames, dtype=np.float32)[None]),
                pb_utils.Tensor("mfcc_length", length.astype(np.int32).reshape(1, 1)),
            ]
            responses.append(pb_utils.InferenceResponse(outputs))
        return responses
