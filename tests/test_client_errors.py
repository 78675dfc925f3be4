"""The chat client types errors that arrive inside a gRPC stream, where Triton sends no status code."""

from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from mmtriton.spec import ModelSpec
from clients.errors import InferenceFailedError, InvalidInputError, ServerUnavailableError
from clients.llm import ChatClient, Sampling, stream_error
from mmtriton.serving.server import TritonServer
from tests.bad_inputs import bad_audio, bad_images


@pytest.fixture(scope="module")
def client(grpc_url: str) -> ChatClient:
    return ChatClient(grpc_url, protocol="grpc", timeout_s=60)


@pytest.mark.parametrize("case", ["png_signature_then_garbage", "truncated_jpeg", "corrupt_png_data", "text"])
def test_bad_image_over_grpc_streaming_is_invalid_input(client: ChatClient, spec: ModelSpec, case: str) -> None:
    payload, expected = bad_images(spec)[case]
    stream = client.stream("What is this?", image=payload, sampling=Sampling(max_tokens=4))
    with pytest.raises(InvalidInputError) as err:
        next(stream)
    assert type(err.value) is InvalidInputError
    assert expected in str(err.value)


def test_bad_audio_and_bad_sampling_over_grpc_streaming_are_invalid_input(client: ChatClient, spec: ModelSpec) -> None:
    payload, expected = bad_audio(spec)["truncated_wav"]
    with pytest.raises(InvalidInputError, match=expected):
        list(client.stream("Listen", audio=payload, sampling=Sampling(max_tokens=4)))
    # The preprocessing model's own checks (mmtriton.llm.prompting) come through the same stream.
    with pytest.raises(InvalidInputError, match="input 'max_tokens': 0 is outside 1..256"):
        list(client.stream("hi", sampling=Sampling(max_tokens=0)))


def test_http_stream_error_events_are_typed_the_same(server: TritonServer, spec: ModelSpec) -> None:
    http = ChatClient(server.http_url, protocol="http", timeout_s=60)
    payload, expected = bad_images(spec)["truncated_png"]
    with pytest.raises(InvalidInputError) as err:
        list(http.stream("What is this?", image=payload, sampling=Sampling(max_tokens=4)))
    assert expected in str(err.value)


def test_stream_messages_without_status_are_typed_by_their_text() -> None:
    """What a stream callback hands over: a message, no status."""
    invalid = [
        "input 'image': truncated PNG: no IEND chunk",
        "in ensemble 'chat_image', input 'image': corrupt PNG header: the IHDR chunk is missing or damaged",
        "[request id: 42] input 'text_input': contains <image> but no image was sent",
    ]
    for message in invalid:
        err = stream_error(InferenceServerException(msg=message))
        assert type(err) is InvalidInputError and str(err) == message
    other = [
        "generation failed: engine thread died",
        "Failed to connect to all addresses",  # a server-side text that merely mentions connecting
        "the output 'text_input' was not found",
        "output 'image': missing",
    ]
    for message in other:
        err = stream_error(InferenceServerException(msg=message))
        assert type(err) is InferenceFailedError and str(err) == message
    # A stream that failed as a whole does carry a status, and keeps its meaning.
    down = stream_error(InferenceServerException(msg="failed to connect", status="StatusCode.UNAVAILABLE"))
    assert type(down) is ServerUnavailableError
    assert type(stream_error("input 'audio': empty payload (0 bytes)")) is InvalidInputError
