"""Hostile and careless input at the front door, against the real CPU server, loopback only.

A table of inputs (JSON, HTTP, parameters, URLs), each with the exact status and a part
of the message the front door must answer with, always the OpenAI error body. Before
and after the table a good request must give the same answer, and the front door's
memory must stay bounded after 200 MB claimed bodies and refused multi-megabyte audio.
The prompt length bound the front door applies is checked against the real tokenizers:
it never refuses a text the tokenizer makes few enough tokens of.
"""

from __future__ import annotations

import base64
import json
import math
import random
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bench.triton_stats import scrape_metrics
from mmtriton.llm.prompting import PromptBuilder
from openai_frontend.config import FrontendConfig
from openai_frontend.media import longest_token_bytes
from openai_frontend.request import REFUSED_FIELDS
from tests.conftest import ROOT
from tests.helpers.frontdoor import DEADLINE_MARGIN_S, DripServer, FrontDoor

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 3.0
FETCH_TIMEOUT_S = 3.0
#: How much the front door's resident memory may grow over the whole hostile run.
RSS_GROWTH_BOUND_MIB = 64
CLAIMED_BYTES = 200_000_000
GOOD = {"model": "m", "messages": [{"role": "user", "content": "Tell me about careless input."}], "max_tokens": 12}


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """``VmRSS`` (or ``VmHWM``, the peak) of a process, in MiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} for pid {pid}")


@dataclass
class Reply:
    """What came back: the status, the JSON body, whether the server closed, and when."""

    status: int
    body: dict
    closed: bool
    elapsed_s: float
    sent: int = 0


def _read_response(sock: socket.socket, timeout_s: float) -> tuple[int, bytes, bool]:
    """Status and body of one HTTP/1.1 response (Content-Length framed); then whether the server closed."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed without a response (got {data!r})")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    length = next(int(v) for k, _, v in (line.partition(":") for line in lines[1:]) if k.strip().lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except ConnectionResetError:
        closed = True
    return status, body[:length], closed


def raw_request(
    door: FrontDoor, head: bytes, chunks: Iterable[bytes] = (), pause_s: float = 0.0, timeout_s: float = 30.0
) -> Reply:
    """Send ``head`` and then ``chunks`` on a socket of our own (``pause_s`` apart), stopping as
    soon as the server answers; return its answer."""
    host, port = door.url.removeprefix("http://").split(":")
    started = time.monotonic()
    sent = 0
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        for piece in [head, *chunks] if head else chunks:
            if select.select([sock], [], [], pause_s)[0]:
                break  # answered already: stop sending
            try:
                sock.sendall(piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        status, body, closed = _read_response(sock, timeout_s)
    return Reply(status, json.loads(body), closed, time.monotonic() - started, sent)


def _post_head(length: int | None = None, path: str = "/v1/chat/completions", extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}{extra}\r\n".encode()


def _chunked(total: int, block: int = 1 << 20) -> Iterator[bytes]:
    """A chunked JSON body of ``total`` bytes (one long string), in 1 MiB chunks."""
    prefix, suffix = b'{"model": "m", "messages": [{"role": "user", "content": "', b'"}]}'
    yield f"{len(prefix):x}\r\n".encode() + prefix + b"\r\n"
    left = total - len(prefix) - len(suffix)
    piece = b"a" * block
    while left > 0:
        part = piece[: min(block, left)]
        left -= len(part)
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
    yield f"{len(suffix):x}\r\n".encode() + suffix + b"\r\n0\r\n\r\n"


def _post(door: FrontDoor, body: bytes | dict, path: str = "/v1/chat/completions", method: str = "POST") -> Reply:
    started = time.monotonic()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = httpx.request(method, f"{door.url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=120)
    return Reply(resp.status_code, resp.json(), False, time.monotonic() - started)


def _chat(**fields: object) -> dict:
    return {**GOOD, **fields}


def _user_text(text: str) -> dict:
    return _chat(messages=[{"role": "user", "content": text}])


def _image_url(url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    return _chat(messages=[{"role": "user", "content": [part, {"type": "text", "text": "What is it?"}]}])


def _deep(depth: int) -> bytes:
    return b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * depth + b"]" * depth + b"}"


@dataclass(frozen=True)
class Hostile:
    """One hostile input: how to send it, and the status and message part expected."""

    name: str
    send: Callable[[FrontDoor, dict], Reply]
    status: int
    message: str
    param: str | None = None


def _json(body: bytes | dict, path: str = "/v1/chat/completions", method: str = "POST") -> Callable[[FrontDoor, dict], Reply]:
    return lambda door, ctx: _post(door, body, path, method)


def _drip_fetch(path: str) -> Callable[[FrontDoor, dict], Reply]:
    return lambda door, ctx: _post(door, _image_url(ctx["drip"].url(path)))


def _slow_headers(door: FrontDoor, ctx: dict) -> Reply:
    head = _post_head(2) + b"{}"
    return raw_request(door, b"", [head[i : i + 1] for i in range(len(head))], pause_s=0.25)


def _slow_body(door: FrontDoor, ctx: dict) -> Reply:
    body = json.dumps(GOOD).encode()
    return raw_request(door, _post_head(len(body)), [body[i : i + 1] for i in range(len(body))], pause_s=0.25)


def _short_body(door: FrontDoor, ctx: dict) -> Reply:
    """Content-Length says more than is ever sent."""
    body = json.dumps(GOOD).encode()
    return raw_request(door, _post_head(len(body) + 100) + body)


def _long_body(door: FrontDoor, ctx: dict) -> Reply:
    """Content-Length says less than is sent: the body is cut there (the rest is not a request)."""
    body = json.dumps(GOOD).encode()
    return raw_request(door, _post_head(len(body) // 2) + body)


def _claimed(door: FrontDoor, ctx: dict) -> Reply:
    return raw_request(door, _post_head(CLAIMED_BYTES))


def _chunked_over(door: FrontDoor, ctx: dict) -> Reply:
    reply = raw_request(door, _post_head(None), _chunked(CLAIMED_BYTES))
    assert reply.sent < CLAIMED_BYTES // 2, reply.sent  # refused while receiving, not after
    return reply


def _bad_request_line(door: FrontDoor, ctx: dict) -> Reply:
    return raw_request(door, b"POST /v1/chat/completions HTTP/1.1 extra\r\nHost: x\r\n\r\n")


def _huge_header(door: FrontDoor, ctx: dict) -> Reply:
    return raw_request(door, _post_head(2, extra="X-Big: " + "b" * 1_000_000 + "\r\n") + b"{}")


CASES = [
    # JSON
    Hostile("nested 2000 deep", _json(_deep(2000)), 400, "the request body is not valid JSON: nested too deeply"),
    Hostile("nested 100000 deep", _json(b"[" * 100_000), 400, "the request body is not valid JSON: nested too deeply"),
    Hostile("lone surrogate in content", _json(b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}]}'),
            400, "messages[0].content: invalid Unicode: a lone surrogate U+D800", "messages[0].content"),
    Hostile("lone low surrogate in stop", _json(b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["ok", "\\udfff"]}'),
            400, "stop[1]: invalid Unicode: a lone surrogate U+DFFF", "stop[1]"),
    Hostile("surrogate as raw CESU-8 bytes in a text part",
            _json(b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "x\xed\xa0\x80"}]}]}'),
            400, "messages[0].content[0].text: invalid Unicode: a lone surrogate U+D800", "messages[0].content[0].text"),
    Hostile("invalid UTF-8", _json(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'), 400,
            "the request body is not valid JSON"),
    Hostile("array body", _json(b"[1, 2]"), 400, "the request body must be a JSON object"),
    Hostile("string body", _json(b'"hello"'), 400, "the request body must be a JSON object"),
    Hostile("NaN", _json(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'), 400,
            "the request body is not valid JSON: NaN is not JSON"),
    Hostile("messages a string", _json({"messages": "hello"}), 400, "messages: Input should be a valid list", "messages"),
    Hostile("max_tokens a word", _json(_chat(max_tokens="many")), 400, "max_tokens: Input should be a valid integer", "max_tokens"),
    Hostile("max_tokens 10**30", _json(_chat(max_tokens=10**30)), 400, f"max_tokens={10**30}: over this model's limit", "max_tokens"),
    Hostile("5000-digit integer", _json(b'{"messages": [], "seed": 1' + b"0" * 5000 + b"}"), 400,
            "Exceeds the limit (4300 digits) for integer string conversion"),
    Hostile("temperature 1e999 (inf)", _json(b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}'),
            400, "temperature=inf: must be within 0..2", "temperature"),
    Hostile("top_k 2**40", _json(_chat(top_k=2**40)), 400, f"top_k={2**40}: must be -1 (off) or within 0..2147483647", "top_k"),
    Hostile("seed -1", _json(_chat(seed=-1)), 400, "seed=-1: must be within 0..", "seed"),
    Hostile("5 MB prompt", _json(_user_text("word " * 1_000_000)), 400,
            "messages: the system and user text is 4999999 bytes, so at least 294118 tokens", "messages"),
    # parameters
    Hostile("logprobs true", _json(_chat(logprobs=True)), 400, "logprobs=true: log probabilities are not supported by this server", "logprobs"),
    Hostile("top_logprobs", _json(_chat(top_logprobs=3)), 400, "top_logprobs=3: log probabilities are not supported", "top_logprobs"),
    Hostile("response_format json_object", _json(_chat(response_format={"type": "json_object"})), 400,
            'response_format: only {"type": "text"} is supported', "response_format"),
    Hostile("tools", _json(_chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])), 400,
            "tools: tool and function calling are not supported by this server", "tools"),
    Hostile("tool_choice required", _json(_chat(tool_choice="required")), 400,
            'tool_choice="required": tool and function calling are not supported', "tool_choice"),
    Hostile("presence_penalty", _json(_chat(presence_penalty=0.5)), 400,
            "presence_penalty=0.5: penalties are not supported by the engines", "presence_penalty"),
    Hostile("frequency_penalty", _json(_chat(frequency_penalty=-1.0)), 400,
            "frequency_penalty=-1.0: penalties are not supported by the engines", "frequency_penalty"),
    Hostile("logit_bias", _json(_chat(logit_bias={"42": 5})), 400, "logit_bias: logit_bias is not supported", "logit_bias"),
    Hostile("temperature 1e9", _json(_chat(temperature=1e9)), 400, "temperature=1000000000.0: must be within 0..2", "temperature"),
    Hostile("top_p 0", _json(_chat(top_p=0)), 400, "top_p=0.0: must be within (0, 1]", "top_p"),
    Hostile("n 2", _json(_chat(n=2)), 400, "n=2: this server returns one choice per request", "n"),
    # HTTP
    Hostile("Content-Length 200 MB", _claimed, 413, "the request body is 200000000 bytes (Content-Length), over this server's limit"),
    Hostile("chunked 200 MB", _chunked_over, 413, "over this server's limit of"),
    Hostile("Content-Length more than sent", _short_body, 408, f"the request body was not received within {BODY_TIMEOUT_S:g} s"),
    Hostile("Content-Length less than sent", _long_body, 400, "the request body is not valid JSON"),
    Hostile("slow headers", _slow_headers, 408, f"the request headers were not received within {HEADER_TIMEOUT_S:g} s"),
    Hostile("slow body", _slow_body, 408, f"the request body was not received within {BODY_TIMEOUT_S:g} s"),
    Hostile("bad request line", _bad_request_line, 400, "invalid HTTP request"),
    Hostile("1 MB header", _huge_header, 400, "invalid HTTP request"),
    Hostile("POST /v1/completions", _json(GOOD, "/v1/completions"), 404, "POST /v1/completions: no such endpoint on this server"),
    Hostile("POST /v1/embeddings", _json({"input": "x"}, "/v1/embeddings"), 404, "POST /v1/embeddings: no such endpoint"),
    Hostile("GET /v1/models/other", _json(b"", "/v1/models/other", "GET"), 404,
            "the model 'other' does not exist; this server serves 'tiny-mm'", "model"),
    Hostile("GET /v1/chat/completions", _json(b"", method="GET"), 405, "GET /v1/chat/completions: method not allowed; this path takes POST"),
    Hostile("DELETE /v1/models", _json(b"", "/v1/models", "DELETE"), 405, "method not allowed; this path takes GET"),
    # URLs
    Hostile("image URL drips its headers", _drip_fetch("/head"), 400,
            f"messages[0].content[0]: image URL refused: fetching took longer than {FETCH_TIMEOUT_S:g} s "
            "(while reading the response headers)", "messages[0].content[0]"),
    Hostile("image URL drips its body", _drip_fetch("/body"), 400,
            f"messages[0].content[0]: image URL refused: fetching took longer than {FETCH_TIMEOUT_S:g} s (while reading the body)",
            "messages[0].content[0]"),
    Hostile("file URL", _json(_image_url("file:///etc/passwd")), 400, "URL scheme 'file' is not allowed", "messages[0].content[0]"),
    Hostile("metadata address", _json(_image_url("http://169.254.169.254/latest/meta-data/")), 400,
            "host '169.254.169.254' is not on this server's URL allowlist", "messages[0].content[0]"),
]
#: Cases whose answer closes the connection (a body or headers that were never read in full).
CLOSING = {"Content-Length 200 MB", "chunked 200 MB", "Content-Length more than sent", "slow headers", "slow body",
           "bad request line", "1 MB header"}
#: Deadline cases: refused within their deadline plus a margin.
DEADLINES = {"slow headers": HEADER_TIMEOUT_S, "slow body": BODY_TIMEOUT_S, "Content-Length more than sent": BODY_TIMEOUT_S,
             "image URL drips its headers": FETCH_TIMEOUT_S, "image URL drips its body": FETCH_TIMEOUT_S}


@pytest.fixture(scope="module")
def door(grpc_url: str, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    front = FrontDoor(
        grpc_url, bundle_dir, tmp_path_factory.mktemp("hostile"), "--allow-url-fetch", "--url-allow-host", "127.0.0.1",
        "--fetch-timeout-s", str(FETCH_TIMEOUT_S), "--header-timeout-s", str(HEADER_TIMEOUT_S),
        "--body-timeout-s", str(BODY_TIMEOUT_S),
    )
    yield front
    front.stop()


@pytest.fixture(scope="module")
def drip() -> Iterator[DripServer]:
    srv = DripServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def before(door: FrontDoor) -> dict:
    """The good request's answer and the front door's memory, before any hostile input."""
    resp = httpx.post(f"{door.url}/v1/chat/completions", json=GOOD, timeout=120)
    assert resp.status_code == 200, resp.text
    return {"answer": resp.json(), "rss_mib": rss_mib(door.process.pid)}


def _answer(completion: dict) -> tuple:
    return (completion["choices"][0]["message"]["content"], completion["choices"][0]["finish_reason"],
            completion["usage"], completion["model"])


def test_a_good_request_before_the_hostile_ones(before: dict) -> None:
    assert before["answer"]["choices"][0]["message"]["content"]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_refused_with_its_status_and_message(door: FrontDoor, drip: DripServer, before: dict, case: Hostile) -> None:
    failures_before = door.metrics().get('mmtriton_openai_requests_total{endpoint="/v1/chat/completions",status="500"}', 0.0)
    reply = case.send(door, {"drip": drip})
    assert reply.status == case.status, (reply.status, reply.body)
    assert set(reply.body) == {"error"} and set(reply.body["error"]) == {"message", "type", "param", "code"}, reply.body
    error = reply.body["error"]
    assert error["type"] == "invalid_request_error"
    assert case.message in error["message"], error["message"]
    assert error["param"] == case.param
    if case.name in CLOSING:
        assert reply.closed
    if case.name in DEADLINES:
        assert reply.elapsed_s < DEADLINES[case.name] + DEADLINE_MARGIN_S
    after = door.metrics().get('mmtriton_openai_requests_total{endpoint="/v1/chat/completions",status="500"}', 0.0)
    assert after == failures_before


def _audio_request(size: int) -> bytes:
    """Two audio parts, the first of ``size`` bytes: refused at the second, after the first was decoded."""
    big = base64.b64encode(random.Random(size).randbytes(size)).decode()
    small = base64.b64encode(b"RIFF....WAVE").decode()
    parts = [{"type": "input_audio", "input_audio": {"data": d, "format": "wav"}} for d in (big, small)]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode()


def test_memory_stays_bounded_after_huge_claims_and_refused_audio(door: FrontDoor, before: dict) -> None:
    for _ in range(4):
        assert _claimed(door, {}).status == 413
    for _ in range(2):
        assert _chunked_over(door, {}).status == 413
    body = _audio_request(8 * 1024 * 1024)
    with httpx.Client(timeout=120) as http:
        for _ in range(20):
            resp = http.post(f"{door.url}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
            assert resp.status_code == 400 and "too many audio clips" in resp.json()["error"]["message"], resp.text
    assert rss_mib(door.process.pid) < before["rss_mib"] + RSS_GROWTH_BOUND_MIB
    # The peak never came near a 200 MB body: the chunked bodies were cut at the limit.
    assert rss_mib(door.process.pid, "VmHWM") < before["rss_mib"] + CLAIMED_BYTES / 2**20


def test_a_client_that_leaves_mid_body_is_counted_as_499(door: FrontDoor) -> None:
    key = 'mmtriton_openai_requests_total{endpoint="/v1/chat/completions",status="%s"}'
    counts = door.metrics()
    host, port = door.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_post_head(1000) + b'{"messages": ')
        time.sleep(0.3)  # the front door is reading the body
    end = time.monotonic() + 10
    while door.metrics().get(key % "499", 0.0) == counts.get(key % "499", 0.0) and time.monotonic() < end:
        time.sleep(0.1)
    after = door.metrics()
    assert after.get(key % "499", 0.0) == counts.get(key % "499", 0.0) + 1
    assert after.get(key % "500", 0.0) == counts.get(key % "500", 0.0)


def test_slow_headers_are_cut_while_a_normal_request_is_answered(door: FrontDoor) -> None:
    got: dict[str, object] = {}

    def drip_headers() -> None:
        got["slow"] = _slow_headers(door, {})

    slow = threading.Thread(target=drip_headers)
    slow.start()
    time.sleep(0.5)
    started = time.monotonic()
    resp = httpx.post(f"{door.url}/v1/chat/completions", json=GOOD, timeout=120)
    answered = time.monotonic() - started
    slow.join(timeout=HEADER_TIMEOUT_S + 30)
    reply = got["slow"]
    assert resp.status_code == 200
    assert isinstance(reply, Reply) and reply.status == 408 and reply.closed
    assert answered < reply.elapsed_s  # the normal request did not wait for the dripping one
    assert reply.elapsed_s < HEADER_TIMEOUT_S + DEADLINE_MARGIN_S


def test_an_oversized_prompt_is_refused_without_reaching_triton(door: FrontDoor, server: "TritonServer") -> None:
    def preprocessing_requests() -> float:
        metrics = scrape_metrics(server.metrics_url)
        return sum(v for k, v in metrics.items()
                   if k.startswith(("nv_inference_request_success{", "nv_inference_request_failure{")) and 'model="preprocessing"' in k)

    assert httpx.post(f"{door.url}/v1/chat/completions", json=GOOD, timeout=120).status_code == 200
    seen = preprocessing_requests()
    assert seen > 0  # the good request went through it: the count is read
    reply = _post(door, _user_text("x" * 5_000_000))
    assert reply.status == 400 and reply.body["error"]["code"] == "prompt_too_long"
    assert preprocessing_requests() == seen
    assert httpx.post(f"{door.url}/v1/chat/completions", json=GOOD, timeout=120).status_code == 200
    assert preprocessing_requests() == seen + 1


def test_the_bound_is_the_tokenizers_own_limit_at_the_edge(door: FrontDoor, builder: PromptBuilder, spec: "ModelSpec") -> None:
    """A text of exactly ``max_input_len * L`` bytes goes to Triton (which tokenizes it); one
    byte more is refused by the front door, and the server's own check agrees."""
    longest = longest_token_bytes(ROOT / "build" / "bundles" / spec.name / "llm" / "tokenizer.json")
    token = next(t for t in builder.tokenizer.get_added_vocab() if len(t.encode()) == longest)
    edge = token * spec.llm.max_input_len
    assert len(edge.encode()) == spec.llm.max_input_len * longest
    at_edge = _post(door, _user_text(edge))
    assert at_edge.status == 400 and at_edge.body["error"]["code"] == "rejected_by_model"  # Triton's verdict
    over = _post(door, _user_text(edge + "x"))
    assert over.status == 400 and over.body["error"]["code"] == "prompt_too_long"
    # The tokenizer itself (no bound of anyone's): one byte more is over the limit in tokens.
    ids = builder.tokenizer.apply_chat_template(
        [{"role": "user", "content": edge + "x"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert len(ids) > spec.llm.max_input_len


def test_a_good_request_after_the_hostile_ones_answers_as_before(door: FrontDoor, before: dict) -> None:
    resp = httpx.post(f"{door.url}/v1/chat/completions", json=GOOD, timeout=120)
    assert resp.status_code == 200
    assert _answer(resp.json()) == _answer(before["answer"])
    assert rss_mib(door.process.pid) < before["rss_mib"] + RSS_GROWTH_BOUND_MIB


def test_eight_slow_fetches_leave_health_and_chat_alone(grpc_url: str, bundle_dir: Path, tmp_path: Path, drip: DripServer) -> None:
    """Eight image URLs that drip at once: /health (whose probe runs on the event loop's default
    executor) and a text request are answered while all eight are still being fetched, and
    every fetch is refused at its deadline."""
    timeout = 5.0
    front = FrontDoor(grpc_url, bundle_dir, tmp_path / "door", "--allow-url-fetch", "--url-allow-host", "127.0.0.1",
                      "--fetch-timeout-s", str(timeout))
    try:
        done: list[tuple[float, Reply]] = []
        lock = threading.Lock()

        def fetch(path: str) -> None:
            reply = _post(front, _image_url(drip.url(path)))
            with lock:
                done.append((time.monotonic(), reply))

        threads = [threading.Thread(target=fetch, args=(p,)) for p in ["/head", "/body"] * 4]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        health = httpx.get(f"{front.url}/health", timeout=120)  # its first probe: nothing cached
        chat = httpx.post(f"{front.url}/v1/chat/completions", json=GOOD, timeout=120)
        answered = time.monotonic()
        for thread in threads:
            thread.join(timeout=timeout + 30)
        assert health.status_code == 200 and chat.status_code == 200
        assert len(done) == 8 and answered < min(t for t, _ in done)
        for finished, reply in done:
            assert reply.status == 400 and f"fetching took longer than {timeout:g} s" in reply.body["error"]["message"]
            assert finished - started < timeout + DEADLINE_MARGIN_S
    finally:
        front.stop()


def test_docs_list_every_refused_field_and_the_tiny_bundles_limits(bundle_dir: Path) -> None:
    text = (ROOT / "docs" / "openai.md").read_text()
    assert all(f"`{name}`" in text for name, _, _ in REFUSED_FIELDS), [n for n, _, _ in REFUSED_FIELDS if f"`{n}`" not in text]
    config = FrontendConfig.from_bundle(bundle_dir, "unused:1")
    assert f"{config.body_limit:,} bytes for the tiny" in text
    assert f"`L` = {config.token_bytes} " in text and f"{config.max_text_bytes:,} bytes" in text


def test_the_limits_come_from_the_bundles_spec_and_are_not_restated(bundle_dir: Path, tmp_path: Path) -> None:
    """The media byte limits and max_output_len are the spec's (bundle.json); the front door has no defaults of its own."""
    import dataclasses

    from openai_frontend.media import MediaLimits

    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    manifest["spec"]["vision"]["max_bytes"], manifest["spec"]["audio"]["max_bytes"] = 12345, 23456
    manifest["spec"]["llm"]["max_output_len"], manifest["spec"]["llm"]["max_input_len"] = 7, 99
    (tmp_path / "llm").mkdir()
    (tmp_path / "bundle.json").write_text(json.dumps(manifest))
    (tmp_path / "llm" / "tokenizer.json").write_bytes((bundle_dir / "llm" / "tokenizer.json").read_bytes())
    config = FrontendConfig.from_bundle(tmp_path, "unused:1")
    assert (config.limits.image_max_bytes, config.limits.audio_max_bytes) == (12345, 23456)
    assert (config.max_output_len, config.max_input_len) == (7, 99)
    defaults = {f.name for cls in (FrontendConfig, MediaLimits) for f in dataclasses.fields(cls)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    assert not defaults & {"max_output_len", "image_max_bytes", "audio_max_bytes", "limits"}, defaults


# --- the prompt length bound against real tokenizers -------------------------------------------


def _texts(tok: object, longest_tokens: list[str]) -> list[str]:
    """Texts meant to get few tokens per byte: the longest tokens repeated, whitespace runs,
    special token strings, multi-byte characters, random Unicode."""
    rng = random.Random(7)
    texts = [t * 50 for t in longest_tokens]
    texts += [" " * 3000, "\n" * 3000, "\t \n" * 500, "日本語" * 300, "😀" * 400, "ab" * 1000, "".join(longest_tokens) * 20]
    texts += ["".join(chr(rng.choice([rng.randrange(32, 127), rng.randrange(0xA0, 0x3000), rng.randrange(0x1F300, 0x1F600)]))
                      for _ in range(rng.randrange(1, 800))) for _ in range(40)]
    return texts


def _check_bound(tok: object, tokenizer_json: Path) -> int:
    """Assert ``tokens(text) >= ceil(bytes / L)`` for hostile texts, and that L is no looser than the
    tokenizer's own tokens need (some single token is L bytes of text). Returns L."""
    longest = longest_token_bytes(tokenizer_json)
    assert longest is not None
    sizes = {}
    for i in range(len(tok)):
        text = tok.decode([i], skip_special_tokens=False)
        if "\ufffd" not in text:
            sizes[text] = len(text.encode())
    assert max(sizes.values()) <= longest  # the independent reference: each token's decoded bytes
    top = sorted(sizes, key=sizes.get, reverse=True)[:10]
    for text in _texts(tok, top):
        count = len(tok.encode(text, add_special_tokens=False))
        assert count >= math.ceil(len(text.encode()) / longest), (text[:40], count, len(text.encode()))
    return longest


def test_bound_holds_for_the_bundles_byte_level_tokenizer(builder: PromptBuilder, spec: "ModelSpec") -> None:
    path = ROOT / "build" / "bundles" / spec.name / "llm" / "tokenizer.json"
    longest = _check_bound(builder.tokenizer, path)
    # Tight: a text of L bytes that is one token (a special token written in the text).
    assert any(len(builder.tokenizer.encode(t, add_special_tokens=False)) == 1 and len(t.encode()) == longest
               for t in builder.tokenizer.get_added_vocab())


def _save(tok: object, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_bound_holds_for_a_sentencepiece_style_tokenizer(tmp_path: Path) -> None:
    """"▁" word starts and byte fallback (Llama 2 style): entries count their UTF-8 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ["▁", "a", "b", "▁a", "▁ab", "▁▁", "▁▁▁▁", "日本", "ab"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "a"), ("▁a", "b"), ("▁", "▁"), ("▁▁", "▁▁"), ("a", "b")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    _check_bound(fast, _save(tok, tmp_path))


@pytest.mark.parametrize("kind", ["whitespace split", "strip normalizer", "lstrip added token", "wordpiece"])
def test_no_bound_for_tokenizers_that_drop_text(tmp_path: Path, kind: str) -> None:
    """Where text can vanish (or one token can swallow any amount of it), no bound holds: a long
    text is a few tokens. longest_token_bytes refuses to give one there."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

    vocab = {"[UNK]": 0, "a": 1, "b": 2, "<mask>": 3}
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=5))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        text = "a" * 3000
    else:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
        text = " " * 3000 + "a"
        if kind == "whitespace split":
            tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        elif kind == "strip normalizer":
            tok.normalizer = normalizers.Strip()
        else:
            tok.add_special_tokens([AddedToken("<mask>", lstrip=True)])
            text = "a" + " " * 3000 + "<mask>"
    assert len(tok.encode(text, add_special_tokens=False).ids) <= 2  # thousands of bytes, a token or two
    assert longest_token_bytes(_save(tok, tmp_path)) is None
