"""Client library for the ``chat_*`` ensembles: gRPC streaming and HTTP (SSE and plain).

The ensemble is chosen from the inputs given (``chat_text``, ``chat_image``,
``chat_audio``, ``chat_image_audio``). Image and audio travel as their raw
encoded bytes; nothing is decoded on the client. Every request carries a
unique request id: the server's streaming detokenizer keys its state on it.

Example::

    client = ChatClient("localhost:8001")            # or ChatClient("localhost:8000", protocol="http")
    for chunk in client.stream("Describe this", image=Path("cat.jpg").read_bytes()):
        print(chunk.text, end="", flush=True)

Errors are typed the same way on every path (see :mod:`clients.errors`):
:class:`InvalidInputError` for a request the server rejected because of an
input, :class:`ServerUnavailableError` when it cannot be reached (the message
names the address: ``could not reach the server at localhost:8001 (gRPC): ...``),
:class:`InvalidURLError` for an address that is not ``host:port`` (checked when the
client is made), and :class:`InferenceFailedError` for any other server-side failure. An error
inside a gRPC stream (or an HTTP ``generate_stream`` error event) carries only
a message, no status code, so there the type comes from the message: this
server's own input errors (``mmtriton.media.validation.InputError``, raised by the
preprocess/check models and by the ``preprocessing`` model's prompt and
sampling checks in ``mmtriton.llm.prompting``) all start with ``input '<name>': ``
and become :class:`InvalidInputError`; any other stream error becomes
:class:`InferenceFailedError`::

    try:
        answer = client.generate("What is this?", image=data)
    except InvalidInputError as err:   # e.g. "input 'image': truncated PNG: no IEND chunk"
        ...
"""

from __future__ import annotations

import http.client
import json
import queue
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clients.address import server_address
from clients.errors import (
    ClientError,
    InferenceFailedError,
    InvalidInputError,
    InvalidURLError,
    ServerUnavailableError,
    from_triton_exception,
    server_unavailable,
)
from mmtriton.contract import (
    AUDIO,
    CHAT_MESSAGES,
    IGNORE_EOS,
    IMAGE,
    LLM_MODEL,
    MAX_TOKENS,
    NUM_INPUT_TOKENS,
    NUM_OUTPUT_TOKENS,
    OUTPUT_IDS,
    SEED,
    STOP_WORDS,
    STREAM,
    TEMPERATURE,
    TEXT_INPUT,
    TEXT_OUTPUT,
    TOP_K,
    TOP_P,
    chat_ensemble,
    input_error_in,
    stop_request_values,
)


def stream_error(error: Exception | str, url: str | None = None) -> ClientError:
    """Type an error that arrived inside a stream, where there is no status code.

    A gRPC stream delivers server-side errors as a message only, and an HTTP
    ``generate_stream`` error event is a message after a 200 status. Such an
    error is an :class:`InvalidInputError` when the message is one of this
    server's input errors (``input '<name>': ...``) and an
    :class:`InferenceFailedError` otherwise. An exception that does carry a
    status (the stream itself failed: unreachable, cancelled) is typed by it.

    Args:
        error: The exception from the stream callback, or the event's message.
        url: The server address, named when the stream failed because the server
            could not be reached.

    Returns:
        The typed client error to raise.
    """
    if not isinstance(error, str):
        status = getattr(error, "status", lambda: None)()
        if status:
            return from_triton_exception(error, url=url)
        message = getattr(error, "message", lambda: None)() or str(error)
    else:
        message = error
    if input_error_in(message):
        return InvalidInputError(message)
    return InferenceFailedError(message)


@dataclass(frozen=True)
class Sampling:
    """User sampling inputs; ``None`` leaves the server's default (greedy)."""

    max_tokens: int = 64
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_words: tuple[str, ...] = ()
    ignore_eos: bool = False  # run every answer to max_tokens (benchmarks)


@dataclass
class Chunk:
    """One streamed piece of the answer."""

    text: str
    token_ids: list[int]
    num_input_tokens: int
    num_output_tokens: int


@dataclass
class Answer:
    """A whole answer with its timings.

    Attributes:
        ttft_s: Seconds from sending to the first token (the whole answer when not streaming).
        total_s: Seconds from sending to the last response.
    """

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second after the first one (decode rate)."""
        decode = self.total_s - self.ttft_s
        return (self.num_output_tokens - 1) / decode if self.num_output_tokens > 1 and decode > 0 else 0.0


def ensemble_for(has_image: bool, has_audio: bool) -> str:
    """Name of the chat ensemble that takes exactly these media inputs."""
    return chat_ensemble(has_image, has_audio)


def conversation_json(messages: list[dict[str, Any]], enable_thinking: bool | None = None) -> str:
    """The ``messages`` input for a conversation: roles and content, media as ``{"type": "image"|"audio"}`` parts.

    Args:
        messages: ``{"role": "system"|"user"|"assistant", "content": str | [parts]}`` dicts;
            a part is ``{"type": "text", "text": ...}``, ``{"type": "image"}`` or ``{"type": "audio"}``
            (the image and clip themselves travel as the ``image`` / ``audio`` inputs).
        enable_thinking: Passed to the chat template when not None.
    """
    payload: dict[str, Any] = {"messages": messages}
    if enable_thinking is not None:
        payload["enable_thinking"] = enable_thinking
    return json.dumps(payload, ensure_ascii=False)


def request_values(
    prompt: str | None,
    image: bytes | None,
    audio: bytes | None,
    sampling: Sampling,
    stream: bool,
    messages: str | None = None,
) -> dict[str, Any]:
    """The chat ensembles' input tensors for one request, as numpy arrays with a batch dim of 1.

    Args:
        prompt: One user turn (``text_input``); None when ``messages`` is given.
        image: Encoded image bytes, or None.
        audio: Encoded audio bytes, or None.
        sampling: Sampling inputs.
        stream: Stream the answer token by token.
        messages: A whole conversation (:func:`conversation_json`) instead of ``prompt``.

    Raises:
        ClientError: Both or neither of ``prompt`` and ``messages``.
    """
    if (prompt is None) == (messages is None):
        raise ClientError("give either a prompt or messages, not both or neither")
    values: dict[str, Any] = {
        MAX_TOKENS: np.array([[sampling.max_tokens]], dtype=np.int32),
        STREAM: np.array([[stream]], dtype=bool),
    }
    if prompt is not None:
        values[TEXT_INPUT] = np.array([[prompt.encode("utf-8")]], dtype=np.object_)
    else:
        values[CHAT_MESSAGES] = np.array([[messages.encode("utf-8")]], dtype=np.object_)
    if image is not None:
        values[IMAGE] = np.frombuffer(image, dtype=np.uint8).reshape(1, -1)
    if audio is not None:
        values[AUDIO] = np.frombuffer(audio, dtype=np.uint8).reshape(1, -1)
    if sampling.temperature is not None:
        values[TEMPERATURE] = np.array([[sampling.temperature]], dtype=np.float32)
    if sampling.top_k is not None:
        values[TOP_K] = np.array([[sampling.top_k]], dtype=np.int32)
    if sampling.top_p is not None:
        values[TOP_P] = np.array([[sampling.top_p]], dtype=np.float32)
    if sampling.seed is not None:
        values[SEED] = np.array([[sampling.seed]], dtype=np.uint64)
    if sampling.ignore_eos:
        values[IGNORE_EOS] = np.array([[True]], dtype=bool)
    if sampling.stop_words:
        values[STOP_WORDS] = np.array([[w.encode("utf-8") for w in sampling.stop_words]], dtype=np.object_)
    return values


TRITON_DTYPES = {np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32", np.dtype(np.uint64): "UINT64",
                  np.dtype(bool): "BOOL", np.dtype(np.uint8): "UINT8", np.dtype(np.object_): "BYTES"}


class ChatClient:
    """Streams answers from the chat ensembles.

    Args:
        url: ``host:port`` of the gRPC (default 8001) or HTTP (default 8000) endpoint.
        protocol: ``grpc`` (bidirectional streaming) or ``http`` (``generate_stream``
            server-sent events, ``generate`` when not streaming).
        timeout_s: Longest wait for any single response.

    Raises:
        InvalidURLError: ``url`` is not ``host:port`` (see :func:`clients.address.server_address`).
        ClientError: An unknown protocol.
    """

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 120.0) -> None:
        if protocol not in ("grpc", "http"):
            raise ClientError(f"protocol must be grpc or http, not {protocol!r}")
        self.url = server_address(url, protocol)
        self.protocol = protocol
        self.timeout_s = timeout_s

    def stream(
        self,
        prompt: str | None,
        *,
        image: bytes | None = None,
        audio: bytes | None = None,
        sampling: Sampling | None = None,
        request_id: str | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> Iterator[Chunk]:
        """Yield the answer piece by piece as the server generates it.

        ``messages`` (a conversation, see :func:`conversation_json`) replaces ``prompt``
        (then None): the server renders every turn with the chat template.

        Raises:
            InvalidInputError: The server rejected an input (the message names it), also when
                the error arrives inside the gRPC stream without a status code.
            ServerUnavailableError: The server cannot be reached.
            InferenceFailedError: Any other server-side failure.
            ClientError: Any other failure.
        """
        model = ensemble_for(image is not None, audio is not None)
        conversation = None if messages is None else conversation_json(messages)
        values = request_values(prompt, image, audio, sampling or Sampling(), stream=True, messages=conversation)
        rid = request_id or uuid.uuid4().hex
        if self.protocol == "grpc":
            yield from self._grpc(model, values, rid)
        else:
            yield from self._http(model, values, rid, stream=True)

    def generate(
        self,
        prompt: str | None,
        *,
        image: bytes | None = None,
        audio: bytes | None = None,
        sampling: Sampling | None = None,
        stream: bool = True,
        request_id: str | None = None,
        on_chunk: Callable[[Chunk], None] | None = None,
        messages: list[dict[str, Any]] | None = None,
    ) -> Answer:
        """Return the whole answer, with time to first token and total time.

        With ``stream=False`` the server sends one response holding every token.
        ``on_chunk`` sees each piece as it arrives (e.g. to print it). ``messages``
        replaces ``prompt`` as in :meth:`stream`.
        """
        model = ensemble_for(image is not None, audio is not None)
        conversation = None if messages is None else conversation_json(messages)
        values = request_values(prompt, image, audio, sampling or Sampling(), stream=stream, messages=conversation)
        rid = request_id or uuid.uuid4().hex
        answer = Answer()
        start = time.perf_counter()
        chunks = self._grpc(model, values, rid) if self.protocol == "grpc" else self._http(model, values, rid, stream)
        for chunk in chunks:
            if not answer.token_ids:
                answer.ttft_s = time.perf_counter() - start
            answer.text += chunk.text
            answer.token_ids += chunk.token_ids
            answer.num_input_tokens = chunk.num_input_tokens
            answer.num_output_tokens = chunk.num_output_tokens
            if on_chunk is not None:
                on_chunk(chunk)
        answer.total_s = time.perf_counter() - start
        return answer

    def stop(self, request_id: str) -> None:
        """Cancel a running request by id (TensorRT-LLM's ``stop`` input, sent to ``tensorrt_llm``).

        The chat ensembles pass the client's request id down to ``tensorrt_llm``;
        a request there with ``stop=true`` and the same id ends that generation
        and frees its slot. gRPC only (the model is decoupled).
        """
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        values = stop_request_values()
        inputs = grpc_inputs(values)
        done: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        try:
            client.start_stream(callback=lambda result, error: done.put(error))
            client.async_stream_infer(LLM_MODEL, inputs, request_id=request_id, enable_empty_final_response=True)
            error = done.get(timeout=self.timeout_s)
            if error is not None:
                raise from_triton_exception(error, url=self.url)
        except InferenceServerException as err:
            raise from_triton_exception(_reported_error(done, lambda item: item) or err, url=self.url) from None
        finally:
            client.stop_stream()
            client.close()

    # -- gRPC ---------------------------------------------------------------------------

    def _grpc(self, model: str, values: dict[str, Any], request_id: str) -> Iterator[Chunk]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        inputs = grpc_inputs(values)
        responses: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            client.async_stream_infer(model, inputs, request_id=request_id, enable_empty_final_response=True)
            while True:
                try:
                    result, error = responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise InferenceFailedError(f"no response from {model} within {self.timeout_s:.0f} s") from None
                if error is not None:
                    finished = True  # an error response is the request's last
                    raise stream_error(error, url=self.url)
                chunk = grpc_chunk(result)
                if chunk is not None:
                    yield chunk
                if result.get_response().parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        except InferenceServerException as err:
            # A stream that failed before the request went out (no server at the address) makes
            # async_stream_infer raise "The stream is no longer in valid state"; the reason (and its
            # status) reaches the callback. Report that, not tritonclient's words.
            cause = _reported_error(responses, lambda item: item[1]) or err
            raise from_triton_exception(cause, url=self.url) from None
        finally:
            # Closing the stream early (the caller stopped iterating) cancels the request on the
            # server. A finished request is not cancelled: Triton 2.51 sometimes leaves an ensemble
            # request referenced for good when a cancellation reaches it just after its last response.
            client.stop_stream(cancel_requests=not finished)
            client.close()

    # -- HTTP ---------------------------------------------------------------------------

    def _http(self, model: str, values: dict[str, Any], request_id: str, stream: bool) -> Iterator[Chunk]:
        body: dict[str, Any] = {"id": request_id}
        for name, value in values.items():
            flat = value.reshape(-1)
            if value.dtype == np.object_:
                items = [v.decode("utf-8") for v in flat]
                body[name] = items if name == STOP_WORDS else items[0]
            elif name in (IMAGE, AUDIO):
                body[name] = flat.tolist()
            else:
                body[name] = flat[0].item()
        endpoint = "generate_stream" if stream else "generate"
        request = urllib.request.Request(
            f"http://{self.url}/v2/models/{model}/{endpoint}",
            data=json.dumps(body).encode("utf-8"),
            headers={"Content-Type": "application/json"},
        )
        try:
            resp = urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail).get("error", detail)
            except (json.JSONDecodeError, AttributeError):
                pass
            raise _http_error(err.code, str(detail), self.url) from None
        except urllib.error.URLError as err:
            raise server_unavailable(self.url, str(err.reason), "HTTP") from None
        except http.client.InvalidURL as err:
            raise InvalidURLError(f"server address {self.url!r}: {err}") from None
        except http.client.HTTPException as err:
            # Something listens but does not speak HTTP/1.1 (e.g. the gRPC port).
            raise ServerUnavailableError(
                f"the server at {self.url} did not answer over HTTP ({type(err).__name__}; is that the gRPC "
                "port? Triton's HTTP port is 8000 by default)",
                self.url,
                connected=True,
            ) from None
        except OSError as err:  # a reset or a timeout before the answer
            raise server_unavailable(self.url, f"{type(err).__name__}: {err}", "HTTP") from None
        try:
            with resp:
                if not stream:
                    yield _json_chunk(_json_object(resp.read(), self.url))
                    return
                for raw in resp:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    event = _json_object(line[len("data:") :], self.url)
                    if "error" in event:
                        raise stream_error(str(event["error"]))
                    chunk = _json_chunk(event)
                    if chunk.token_ids or chunk.text:
                        yield chunk
        except (OSError, http.client.HTTPException) as err:
            raise InferenceFailedError(
                f"the answer from the server at {self.url} (HTTP) broke off: {type(err).__name__}: {err}"
            ) from None


def grpc_inputs(values: dict[str, np.ndarray]) -> list[Any]:
    """``tritonclient.grpc.InferInput`` objects holding ``values``."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), TRITON_DTYPES[value.dtype])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    return inputs


def grpc_chunk(result: Any) -> Chunk | None:
    """One streamed gRPC response as a :class:`Chunk` (None for the empty final response)."""
    text = result.as_numpy(TEXT_OUTPUT)
    if text is None:
        return None  # the empty final response
    ids = result.as_numpy(OUTPUT_IDS)
    return Chunk(
        text=b"".join(t if isinstance(t, bytes) else str(t).encode() for t in text.reshape(-1)).decode("utf-8"),
        token_ids=[] if ids is None else ids.reshape(-1).tolist(),
        num_input_tokens=int(result.as_numpy(NUM_INPUT_TOKENS).reshape(-1)[0]),
        num_output_tokens=int(result.as_numpy(NUM_OUTPUT_TOKENS).reshape(-1)[0]),
    )


def _json_chunk(event: dict[str, Any]) -> Chunk:
    ids = event.get(OUTPUT_IDS, [])
    return Chunk(
        text=event.get(TEXT_OUTPUT, ""),
        token_ids=ids if isinstance(ids, list) else [ids],
        num_input_tokens=int(event.get(NUM_INPUT_TOKENS, 0)),
        num_output_tokens=int(event.get(NUM_OUTPUT_TOKENS, 0)),
    )


def _reported_error(responses: queue.Queue, error_of: Callable[[Any], Any], wait_s: float = 2.0) -> Exception | None:
    """The error a stream callback put on ``responses`` (within ``wait_s``), or None."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            item = responses.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None
        error = error_of(item)
        if error is not None:
            return error


def _json_object(data: bytes | str, url: str) -> dict[str, Any]:
    """One JSON object from the server; anything else means it is not this server's API."""
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        preview = data[:80] if isinstance(data, str) else data[:80].decode("utf-8", "replace")
        raise InferenceFailedError(f"the server at {url} (HTTP) did not answer with JSON: {preview!r}")
    return value


def _http_error(code: int, message: str, url: str | None = None) -> ClientError:
    if code == 400:
        return InvalidInputError(message)
    if code in (502, 503):
        return server_unavailable(url, message, "HTTP")
    return InferenceFailedError(f"HTTP {code}: {message}")
