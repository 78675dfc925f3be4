"""postprocessing: token ids -> text, incremental per request id (mmtriton.detokenize)."""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.detokenize import DetokenizerStates


class TritonPythonModel:
    """Decodes each response of the engine; the chunks of one request share a detokenizer."""

    def initialize(self, args: dict) -> None:
        from transformers import AutoTokenizer

        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])
        self.streams = DetokenizerStates(self.tokenizer)

    def _text(self, request) -> str:
        tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # [1, beams, n]
        lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # [1, beams]
        ids = tokens.reshape(-1, tokens.shape[-1])[0, : int(lengths.reshape(-1)[0])].tolist()
        total = pb_utils.get_input_tensor_by_name(request, "NUM_OUTPUT_TOKENS")
        if total is None or not request.request_id():
            # No way to tie chunks together: each response is decoded on its own.
            return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        # num_output_tokens counts every token generated so far: a chunk that starts at 0 opens a stream.
        first = int(total.as_numpy().reshape(-1)[0]) == len(ids)
        return self.streams.push(request.request_id(), ids, restart=first)

    def execute(self, requests: list) -> list:
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT", np.array([[self._text(r).encode("utf-8")]], dtype=np.object_))]
            )
            for r in requests
        ]
