"""Hostile and careless input sent straight to Triton (HTTP JSON, HTTP binary, gRPC), on the session server.

Each case is what an independent client can send without this project's client library:
its exact status and a part of the message it must get. Afterwards the server is the same
process, a good request answers exactly as before, and the server's memory stayed within a
bound. The front door's own hostile cases are in ``tests/test_openai_hostile.py``; refused
multi-megabyte media, sent many times, in ``tests/test_refused_payloads.py``.

Two of Triton 2.51's own behaviours are pinned here as found: a lone UTF-16 surrogate in
an HTTP JSON string is a 500 from Triton's JSON parser (not our code), and a JSON value
nested ~100,000 deep crashes its HTTP endpoint (so that case is not sent; see
``docs/design.md``, "Bad input": Triton's ports are published on loopback only).
"""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from clients.llm import ChatClient, Sampling, grpc_inputs, request_values
from mmtriton.media.samples import encode_image, synthetic_image
from mmtriton.serving.server import TritonServer
from mmtriton.spec import ModelSpec
from tests.bad_inputs import strip_png
from tests.helpers.servers import rss_mib

#: tritonserver RSS growth allowed over the whole table (each case once); measured +0-20 MiB.
RSS_BOUND_MIB = 64


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[TritonServer], tuple[object, str]]  # -> (status, message)
    status: object  # HTTP status or grpc status name
    message: str


def _http(path: str, body: bytes, headers: dict[str, str] | None = None) -> Callable[[TritonServer], tuple[object, str]]:
    def send(server: TritonServer) -> tuple[object, str]:
        request = urllib.request.Request(
            f"http://{server.http_url}{path}", data=body, headers=headers or {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read()).get("error", "")

    return send


def _generate(body: dict, model: str = "chat_text") -> Callable[[TritonServer], tuple[object, str]]:
    return _http(f"/v2/models/{model}/generate", json.dumps(body).encode())


def _stream(model: str, values: dict[str, np.ndarray]) -> Callable[[TritonServer], tuple[object, str]]:
    """One request over a gRPC stream, as a plain tritonclient user sends it.

    Errors inside a stream carry a message and no status (Triton 2.51); the ``input '<name>':``
    prefix is what says the client's input was refused. Triton's ``triton_grpc_error`` header,
    which would end the stream with a status code, is not used: see ``docs/design.md``.
    """

    def send(server: TritonServer) -> tuple[object, str]:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        responses: queue.Queue = queue.Queue()
        try:
            client.start_stream(callback=lambda result, error: responses.put(error))
            client.async_stream_infer(model, grpc_inputs(values))
            error = responses.get(timeout=60)
        finally:
            client.stop_stream()
            client.close()
        if error is None:
            return "OK", ""
        return error.status(), error.message()

    return send


def _unary(request: service_pb2.ModelInferRequest) -> Callable[[TritonServer], tuple[object, str]]:
    """A raw ``ModelInfer`` call (no client library checks in between)."""

    def send(server: TritonServer) -> tuple[object, str]:
        with grpc.insecure_channel(server.grpc_url) as channel:
            try:
                service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
            except grpc.RpcError as err:
                return f"StatusCode.{err.code().name}", err.details()
        return "OK", ""

    return send


def _raw_request(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=datatype, shape=shape)
    request.raw_input_contents.append(raw)
    return request


def _chat_values(**overrides: object) -> dict[str, np.ndarray]:
    values = request_values("Hello", None, None, Sampling(max_tokens=4), stream=True)
    for key, value in overrides.items():
        values[key] = value
    return values


def cases(spec: ModelSpec) -> list[Case]:
    good_jpeg = encode_image(synthetic_image(64, 48), "JPEG")
    header = json.dumps(
        {"inputs": [{"name": "image", "shape": [1, 1_000_000], "datatype": "UINT8", "parameters": {"binary_data_size": 1_000_000}}]}
    ).encode()
    binary = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
    invalid_utf8 = np.array([[b"caf\xe9 \xff"]], dtype=object)
    max_out = spec.llm.max_output_len
    return [
        Case("5 MB text prompt", _generate({"text_input": "x " * 2_500_000, "max_tokens": 4}), 400,
             "input 'text_input': text of 5000000 bytes cannot fit the engine's max input length"),
        Case("messages nested 50000 deep", _generate({"messages": "[" * 50_000 + "]" * 50_000, "max_tokens": 4}), 400,
             "input 'messages': JSON nested too deeply"),
        Case("messages that are not JSON", _generate({"messages": "{not json", "max_tokens": 4}), 400,
             "input 'messages': not valid JSON"),
        Case("text_input and messages", _generate({"text_input": "a", "messages": '{"messages": []}', "max_tokens": 4}), 400,
             "send either text_input (one user turn) or messages"),
        Case("neither text_input nor messages", _generate({"max_tokens": 4}), 400, "send either text_input"),
        Case("max_tokens 2**31-1", _generate({"text_input": "a", "max_tokens": 2**31 - 1}), 400,
             f"input 'max_tokens': 2147483647 is outside 1..{max_out}"),
        Case("negative temperature", _generate({"text_input": "a", "max_tokens": 4, "temperature": -1.0}), 400,
             "input 'temperature': -1.0 must be a finite number >= 0"),
        Case("top_p 7", _generate({"text_input": "a", "max_tokens": 4, "top_p": 7.0}), 400, "input 'top_p': 7.0 must be within [0, 1]"),
        Case("seed with sampling on the CPU engine",
             _generate({"text_input": "a", "max_tokens": 4, "temperature": 0.8, "top_p": 0.9, "seed": 3}), 400,
             "input 'seed': per-request seeds are not supported by this engine"),
        Case("<image> in the text without an image", _generate({"text_input": "look: <image>", "max_tokens": 4}), 400,
             "input 'text_input': contains <image> but no image was sent"),
        Case("370-byte 100000x1 PNG over HTTP JSON", _generate({"text_input": "a", "max_tokens": 4, "image": list(strip_png(100_000, 1))}, "chat_image"),
             400, "input 'image': image of 100000x1 has too extreme an aspect ratio"),
        Case("lone surrogate in HTTP JSON (Triton's own parser)", _http("/v2/models/chat_text/generate", b'{"text_input": "a\\ud800b", "max_tokens": 4}'),
             500, "The surrogate pair in string is invalid"),
        Case("binary tensor shorter than its declared size", _http("/v2/models/embed_image/infer", header + good_jpeg, binary), 400,
             "unexpected size for input 'image'"),
        Case("invalid UTF-8 text_input over gRPC", _stream("chat_text", _chat_values(text_input=invalid_utf8)),
             None, "input 'text_input': not valid UTF-8 text"),
        Case("invalid UTF-8 stop word over gRPC", _stream("chat_text", _chat_values(stop_words=invalid_utf8)),
             None, "input 'stop_words': not valid UTF-8 text"),
        Case("max_tokens as FP32 over a gRPC stream", _stream("chat_text", _chat_values(max_tokens=np.array([[4.0]], dtype=np.float32))),
             None, "input 'max_tokens' data-type is 'FP32', but model 'chat_text' expects 'INT32'"),
        Case("raw bytes shorter than the shape", _unary(_raw_request("embed_image", "image", "UINT8", [1, 4096], good_jpeg[:100])),
             "StatusCode.INVALID_ARGUMENT", "input byte size mismatch for input 'image' for model 'embed_image'. Expected 4096, got 100"),
        Case("image sent as BYTES", _unary(_raw_request("embed_image", "image", "BYTES", [1, 1], b"\x03\x00\x00\x00abc")),
             "StatusCode.INVALID_ARGUMENT", "input 'image' data-type is 'BYTES', but model 'embed_image' expects 'UINT8'"),
        Case("unary ModelInfer on a decoupled chat ensemble", _unary(_raw_request("chat_text", "text_input", "BYTES", [1, 1], b"\x02\x00\x00\x00hi")),
             "StatusCode.UNIMPLEMENTED", "decoupled"),
        Case("unknown model", _unary(_raw_request("no_such_model", "x", "UINT8", [1], b"\x00")),
             "StatusCode.NOT_FOUND", "unknown model"),
    ]


def test_hostile_inputs_get_their_error_and_leave_the_server_as_it_was(server: TritonServer, spec: ModelSpec) -> None:
    client = ChatClient(server.grpc_url, timeout_s=60)
    sampling = Sampling(max_tokens=12)
    before = client.generate("Tell me about the sea.", sampling=sampling).token_ids
    pid = server.process.pid
    rss = rss_mib(pid)
    table = cases(spec)
    assert len(table) >= 20
    wrong = []
    for case in table:
        status, message = case.send(server)
        if status != case.status or case.message not in message:
            wrong.append(f"{case.name}: got {status} {message[:300]!r}, want {case.status} ...{case.message!r}...")
    assert not wrong, "\n".join(wrong)
    assert server.process.poll() is None and server.process.pid == pid
    assert client.generate("Tell me about the sea.", sampling=sampling).token_ids == before
    growth = rss_mib(pid) - rss
    assert growth < RSS_BOUND_MIB, f"tritonserver grew by {growth:.0f} MiB over {len(table)} hostile requests"


@pytest.mark.parametrize("source", ["text_input", "messages"])
def test_the_text_bound_never_refuses_a_prompt_that_fits(builder: "PromptBuilder", source: str) -> None:  # noqa: F821
    """The size bound is a proof, not a guess: text made only of the tokenizer's longest token, as many
    times as the engine takes, is exactly at the bound and tokenizes to no more than max_input_len
    tokens; one byte more than the bound is refused before tokenizing."""
    from mmtriton.contract import InputError

    vocab = builder.tokenizer.get_vocab()
    longest = max(vocab, key=lambda t: len(t.encode("utf-8")))
    text_piece = builder.tokenizer.convert_tokens_to_string([longest])
    assert len(text_piece.encode("utf-8")) <= builder.max_token_bytes
    repeats = builder.max_text_bytes // max(1, len(text_piece.encode("utf-8")))
    text = text_piece * repeats
    assert len(text.encode("utf-8")) <= builder.max_text_bytes
    builder.check_text_size(source, [text])  # not refused by size
    over = "a" * (builder.max_text_bytes + 1)
    with pytest.raises(InputError, match=rf"^input '{source}': text of {builder.max_text_bytes + 1} bytes cannot fit"):
        builder.check_text_size(source, [over])
    # The claim the bound rests on, for this worst case: at least one token per max_token_bytes bytes.
    n = len(builder.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n >= len(text.encode("utf-8")) / builder.max_token_bytes
