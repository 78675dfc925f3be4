"""Async gRPC streaming to the chat ensembles (one bidirectional stream per request).

The request is built from the same tensors as :func:`clients.llm.request_values`
and carries Triton's ``triton_enable_empty_final_response`` parameter, so the last
response is flagged and the stream can be closed without cancelling a finished
request. A stream given up before its final response (the HTTP client went away)
is cancelled: Triton then cancels the ensemble request and the ``postprocessing``
model stops the engine's generation (``docs/design.md``, "Failed and abandoned
requests"), which frees its slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from clients.errors import InvalidInputError
from clients.llm import Chunk, grpc_chunk, stream_error
from openai_frontend.errors import APIError

LOGGER = logging.getLogger(__name__)

#: Media up to the spec's limits travel in one gRPC message; gRPC's default receive limit is 4 MiB.
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


class TritonError(Exception):
    """A failure reported by Triton for one request.

    Attributes:
        invalid_input: The server rejected an input (``input '<name>': ...``): the client's fault.
        input_name: The input the server named, when ``invalid_input``.
    """

    def __init__(self, message: str, invalid_input: bool, input_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.invalid_input = invalid_input
        self.input_name = input_name


def infer_request(model: str, values: dict[str, np.ndarray], request_id: str) -> service_pb2.ModelInferRequest:
    """The ``ModelInferRequest`` for one chat request, with the empty final response enabled."""
    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    for name, value in values.items():
        request.inputs.add(name=name, datatype=np_to_triton_dtype(value.dtype), shape=list(value.shape))
        raw = serialize_byte_tensor(value).item() if value.dtype == np.object_ else value.tobytes()
        request.raw_input_contents.append(raw)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


def _typed(message: str) -> TritonError:
    error = stream_error(message)
    if isinstance(error, InvalidInputError):
        start = message.find("input '")
        name = message[start + 7 : message.find("'", start + 7)] if start >= 0 else None
        return TritonError(message[start:] if start >= 0 else message, True, name)
    return TritonError(message, False)


class TritonChat:
    """One gRPC channel to Triton, shared by every request.

    Args:
        url: ``host:port`` of Triton's gRPC endpoint.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def stream(self, model: str, values: dict[str, np.ndarray], request_id: str) -> AsyncIterator[Chunk]:
        """Yield the answer's chunks as Triton streams them.

        Closing the iterator (or cancelling the task iterating it) before the final
        response cancels the request on the server.

        Raises:
            TritonError: An error response (an input error, or the inference failed).
            APIError: 503 when Triton cannot be reached, 502 when the stream breaks.
        """
        done = asyncio.Event()
        request = infer_request(model, values, request_id)

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield request
            await done.wait()  # keep the stream open until the final response

        call: Any = self._stub.ModelStreamInfer(requests())
        finished = False
        try:
            async for response in call:
                if response.error_message:
                    finished = True  # an error response is the request's last
                    raise _typed(response.error_message)
                result = InferResult(response.infer_response)
                chunk = grpc_chunk(result)
                final = response.infer_response.parameters["triton_final_response"].bool_param
                LOGGER.debug(
                    "%s: response %s tokens=%s final=%s", request_id, None if chunk is None else repr(chunk.text),
                    None if chunk is None else chunk.num_output_tokens, final,
                )
                if chunk is not None:
                    yield chunk
                if final:
                    finished = True
                    return
            finished = True
            raise APIError(502, "Triton closed the stream before the final response", code="upstream_error")
        except grpc.aio.AioRpcError as err:
            finished = True
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise APIError(503, f"Triton at {self.url} is unavailable: {err.details()}", code="upstream_unavailable") from None
            raise APIError(502, f"Triton stream failed: {err.code().name}: {err.details()}", code="upstream_error") from None
        finally:
            done.set()
            if not finished:
                # Given up mid-answer: cancelling the call cancels the ensemble request.
                LOGGER.debug("cancelling Triton stream of request %s", request_id)
                call.cancel()
