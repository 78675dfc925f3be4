"""image_preprocess on the python backend (cpu, gpu-hf, gpu-vllm): builds 1/dali.py on the device preprocess.json names."""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import error_response
from mmtriton.media.preprocess import ImagePreprocessor
from mmtriton.backend.stub_watchdog import exit_with_parent
from mmtriton.contract import InputError


class TritonPythonModel:
    """Checks each payload, then decodes the good ones as one DALI batch."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.preprocess = ImagePreprocessor(version_dir / "dali.py")

    def execute(self, requests: list) -> list:
        payloads = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy().reshape(-1) for r in requests]
        responses = []
        for result in self.preprocess(payloads):
            if isinstance(result, InputError):
                responses.append(error_response(str(result)))
            else:
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("pixel_values", result[0][None])]))
        return responses
