"""preprocessing: user request -> TensorRT-LLM engine inputs (logic in mmtriton.llm.prompting)."""

from __future__ import annotations

import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import error_response, model_parameters, optional_input, scalar_input
from mmtriton.llm.prompting import PromptBuilder, SamplingLimits, check_sampling
from mmtriton.backend.stub_watchdog import exit_with_parent
from mmtriton.contract import InputError

LOGGER = logging.getLogger(__name__)


def _str(value: object, name: str) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(name, f"not valid UTF-8 text (byte {err.start}: {err.reason})") from None


def _text(tensor: np.ndarray, name: str) -> str:
    return _str(tensor.reshape(-1)[0], name)


class TritonPythonModel:
    """Builds input ids, the prompt table and the engine's sampling inputs for each request."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        params = model_parameters(args)
        self.builder = PromptBuilder.from_parameters(params)
        self.limits = SamplingLimits(max_output_len=int(params["max_output_len"]))
        self.end_id = int(params["end_id"])
        self.pad_id = int(params["pad_id"])

    def _one(self, request) -> pb_utils.InferenceResponse:
        query, messages = optional_input(request, "QUERY"), optional_input(request, "MESSAGES")
        if (query is None) == (messages is None):
            raise InputError("text_input", "send either text_input (one user turn) or messages (a conversation), not both or neither")
        max_tokens = int(scalar_input(request, "REQUEST_OUTPUT_LEN"))
        check_sampling(
            max_tokens=max_tokens,
            temperature=scalar_input(request, "TEMPERATURE"),
            top_k=scalar_input(request, "TOP_K"),
            top_p=scalar_input(request, "TOP_P"),
            limits=self.limits,
        )
        media = optional_input(request, "IMAGE_EMBEDDINGS"), optional_input(request, "AUDIO_EMBEDDINGS")
        if messages is not None:
            prompt = self.builder.build_conversation(_text(messages, "messages"), *media)
        else:
            prompt = self.builder.build(_text(query, "text_input"), *media)
        stop = optional_input(request, "STOP_WORDS_DICT")
        words = [] if stop is None else [_str(w, "stop_words") for w in stop.reshape(-1)]
        outputs = {
            "INPUT_ID": prompt.input_ids[None],
            "REQUEST_INPUT_LEN": np.array([[prompt.input_ids.size]], dtype=np.int32),
            "OUT_REQUEST_OUTPUT_LEN": np.array([[max_tokens]], dtype=np.int32),
            # ignore_eos (benchmarks): an end id no token has, so every answer runs to max_tokens.
            "OUT_END_ID": np.array([[-1 if scalar_input(request, "IGNORE_EOS") else self.end_id]], dtype=np.int32),
            "OUT_PAD_ID": np.array([[self.pad_id]], dtype=np.int32),
            "STOP_WORDS_IDS": self.builder.encode_stop_words(words)[None],
            "RETURN_NUM_TOKENS": np.array([[True]], dtype=bool),
        }
        if prompt.prompt_table is not None:
            outputs["PROMPT_EMBEDDING_TABLE"] = prompt.prompt_table[None]
            outputs["PROMPT_VOCAB_SIZE"] = np.array([[prompt.prompt_table.shape[0]]], dtype=np.int32)
        wanted = set(request.requested_output_names())
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items() if k in wanted])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                responses.append(self._one(request))
            except InputError as err:
                responses.append(error_response(str(err)))
            except Exception as err:  # noqa: BLE001 - one request's failure must not fail its batch
                LOGGER.exception("preprocessing failed for one request")
                responses.append(error_response(f"preprocessing failed: {err.__class__.__name__}: {err}", "INTERNAL"))
        return responses
