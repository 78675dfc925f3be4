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
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import InferResult, service_pb2, service_pb2_grpc
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from clients.llm import Chunk, grpc_chunk
from mmtriton.contract import input_error_in
from openai_frontend.errors import APIError

LOGGER = logging.getLogger(__name__)

#: Media up to the spec's limits travel in one gRPC message (gRPC's default receive limit is 4 MiB).
#: round_robin spreads streams over every address the target resolves to (a headless Service's
#: worker pods); gRPC's default, pick_first, would send them all to one.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.lb_policy_name", "round_robin"),
]
#: A channel resolves its target's addresses when it connects and again only when a connection
#: drops, so a new worker pod would get no streams; a fresh channel every this many seconds does.
CHANNEL_REFRESH_S = 60.0


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
    found = input_error_in(message)
    if found is None:
        return TritonError(message, False)
    name, text = found
    return TritonError(text, True, name)


class _Channel:
    """A gRPC channel, its stub, when it was made, and the streams open on it."""

    def __init__(self, url: str) -> None:
        self.channel = grpc.aio.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.born = time.monotonic()
        self.streams = 0
        self.retired = False


class TritonChat:
    """gRPC channels to Triton shared by every request: the current one, and retired ones until their streams end.

    Args:
        url: Triton's gRPC endpoint: ``host:port``, or a gRPC target such as
            ``dns:///triton-grpc:8001`` that resolves to several workers (streams are
            spread over them, see :data:`_CHANNEL_OPTIONS`).
        refresh_s: Age after which the next request opens a new channel (so the target
            is resolved again); the old one closes once its open streams finish. 0: never.
    """

    def __init__(self, url: str, refresh_s: float = CHANNEL_REFRESH_S) -> None:
        self.url = url
        self.refresh_s = refresh_s
        self._current = _Channel(url)
        self._retired: list[_Channel] = []

    def _take(self) -> _Channel:
        if self.refresh_s > 0 and time.monotonic() - self._current.born >= self.refresh_s:
            old, self._current = self._current, _Channel(self.url)
            old.retired = True
            self._retired.append(old)
            LOGGER.debug("new channel to %s (the old one closes after its %d open streams)", self.url, old.streams)
        self._current.streams += 1
        return self._current

    async def _give_back(self, entry: _Channel) -> None:
        entry.streams -= 1
        if entry.retired and entry.streams == 0:
            self._retired.remove(entry)
            await entry.channel.close()

    @property
    def channels(self) -> int:
        """Channels open now (the current one and retired ones with open streams, or not yet closed)."""
        return 1 + len(self._retired)

    async def close(self) -> None:
        """Close every channel."""
        for entry in [self._current, *self._retired]:
            await entry.channel.close()
        self._retired.clear()

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

        entry = self._take()
        call: Any = entry.stub.ModelStreamInfer(requests())
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
            await self._give_back(entry)
