"""postprocessing: token ids -> text, incremental per request id (mmtriton.llm.detokenize).

It is also where a client that went away is noticed (see mmtriton.backend.cancellation): a
chunk whose request is cancelled is still answered normally, and the generation of
that request id is stopped through ``tensorrt_llm``'s ``stop`` input.
"""

from __future__ import annotations


import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import model_parameters
from mmtriton.backend.cancellation import StopForwarder
from mmtriton.contract import LLM_MODEL, stop_request_values
from mmtriton.llm.detokenize import DetokenizerStates
from mmtriton.backend.stub_watchdog import exit_with_parent


def _stop_generation(request_id: str) -> None:
    """Send ``tensorrt_llm`` a ``stop=true`` request for ``request_id`` and wait for its final flag."""
    inputs = [pb_utils.Tensor(name, value) for name, value in stop_request_values().items()]
    request = pb_utils.InferenceRequest(
        model_name=LLM_MODEL, inputs=inputs, requested_output_names=["output_ids"], request_id=request_id
    )
    for response in request.exec(decoupled=True):
        if response.has_error():
            raise RuntimeError(response.error().message())


class TritonPythonModel:
    """Decodes each response of the engine; the chunks of one request share a detokenizer."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        from transformers import AutoTokenizer

        params = model_parameters(args)
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])
        self.streams = DetokenizerStates(self.tokenizer)
        self.stops = StopForwarder(_stop_generation)

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
        responses = []
        for request in requests:
            if request.is_cancelled():
                self.stops.cancelled(request.request_id())
            responses.append(
                pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUTPUT", np.array([[self._text(request).encode("utf-8")]], dtype=np.object_))]
                )
            )
        return responses

    def finalize(self) -> None:
        self.stops.close()
