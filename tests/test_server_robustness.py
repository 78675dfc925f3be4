"""Failed and abandoned requests leave nothing behind, against a real server of their own.

This module starts its own ``tritonserver`` (not the session one): its last test stops
it and inspects the shutdown, which is the only place Triton 2.51 reports requests
still in flight ("Model 'x' (version 1) has N in-flight inferences"). In between:

* two-media requests (``embed_image_audio``, ``chat_image_audio``) mixing good, bad
  image, bad audio and decode-time-corrupt payloads, large audio included, over gRPC
  streaming, plain gRPC and HTTP; afterwards nothing is pending, server memory stayed
  within a bound of its post-warm-up value, and good requests still answer exactly;
* storms of clients that close their gRPC stream or HTTP connection before the first
  token or after a few tokens, at concurrency 32; generation stops within a bounded
  number of tokens, the engine's queue and batch drain, and the cancellations are
  counted as such;
* the liveness probe (``python -m mmtriton.probe``) passes on the healthy server and
  fails within its deadline while inference is stuck (an image stub stopped with
  SIGSTOP), although ``/v2/health/ready`` still answers 200;
* the shutdown finishes inside the exit timeout with no request in flight, no
  shared-memory region and no process left.

Everything is bounded in count and time and goes to loopback only.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from clients.errors import ClientError, InvalidInputError
from clients.llm import ChatClient, Sampling, grpc_inputs, request_values
from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image
from mmtriton.serving.server import TritonServer, session_processes
from mmtriton.spec import ModelSpec
from tests.bad_inputs import bad_audio, bad_images
from tests.conftest import probe_server, stub_pid
from tests.helpers.servers import embed_grpc, embed_http, engine, make_server, rss_mib, running, wait_idle

ROOT = Path(__file__).resolve().parents[1]
LOGGER = logging.getLogger(__name__)
EXIT_TIMEOUT_S = 15
# Growth of the server process allowed over 40 rejected requests that each carry a 10.8 MB
# clip, once two rounds of mixed traffic have brought the server's buffer pools and
# allocators to their working size (measured: up to ~100 MiB on the plain gRPC path, whose
# reusable request/response objects keep their largest buffers). Stranding the 40 would
# hold 432 MB. Over HTTP chat the clip is 0.9 MB (it travels as JSON), so there the bound
# says less and the shutdown check below is what catches a stranded request.
RSS_GROWTH_BOUND_MIB = 192
# Tokens the engine may still generate for a closed request beyond what its client read
# (without cancellation: all 128). The stop travels postprocessing -> tensorrt_llm through
# the python backend (tens of milliseconds on 2 shared cores) while the tiny engine steps
# every few milliseconds, so on this machine that is many steps: measured 7-17 tokens over
# gRPC and 21-31 over HTTP, where Triton notices a closed connection only when a write to
# it fails. The bounds leave room for a loaded CI machine; with a real model's 10-30 ms
# steps the same latency is a step or two.
TOKENS_AFTER_CLOSE_BOUND = {"grpc": 40, "http": 64}
CHAT = Sampling(max_tokens=4)


@dataclass(frozen=True)
class Payloads:
    image: bytes
    audio: bytes
    large_audio: bytes  # ~10.8 MB float WAV: what a stranded request would hold on to
    medium_audio: bytes  # ~1 MB, for HTTP's JSON body (a list of byte values)
    bad_image: bytes  # header damage: rejected before decoding
    corrupt_image: bytes  # passes every header check, fails in DALI
    bad_audio: bytes  # truncated WAV
    corrupt_audio: bytes  # truncated FLAC: only decoding finds it


def _float_wav(samples: np.ndarray, rate: int) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def payloads(spec: ModelSpec) -> Payloads:
    images, clips = bad_images(spec), bad_audio(spec)
    return Payloads(
        image=encode_image(synthetic_image(320, 240, seed=3), "JPEG"),
        audio=encode_audio(synthetic_audio(16000, 2.0, seed=3), 16000),
        large_audio=_float_wav(synthetic_audio(48000, 28.0, channels=2, seed=4), 48000),
        medium_audio=encode_audio(synthetic_audio(16000, 28.0, seed=5), 16000),
        bad_image=images["truncated_jpeg"][0],
        corrupt_image=images["corrupt_png_data"][0],
        bad_audio=clips["truncated_wav"][0],
        corrupt_audio=clips["truncated_flac"][0],
    )


@pytest.fixture(scope="module")
def rserver(cpu_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    srv = make_server(cpu_repo, tmp_path_factory.mktemp("robust-server"), exit_timeout_s=EXIT_TIMEOUT_S)
    with running(srv, "robustness server"):
        yield srv


# ----------------------------------------------------------------------------- helpers


def chat(url: str, protocol: str, image: bytes, audio: bytes) -> list[int]:
    return ChatClient(url, protocol=protocol, timeout_s=60).generate("Describe both.", image=image, audio=audio, sampling=CHAT).token_ids


# ----------------------------------------------------------------------------- two-media failures

def large_clip(p: Payloads, ensemble: str, protocol: str) -> bytes:
    """The 10.8 MB clip, except for chat over HTTP, where the bytes travel as a JSON list."""
    return p.medium_audio if (protocol == "http" and ensemble.startswith("chat")) else p.large_audio


def mixed_cases(p: Payloads, large: bytes) -> list[tuple[str, bytes, bytes, str | None]]:
    """(name, image, audio, the input the error must name, or None for success)."""
    return [
        ("good", p.image, p.audio, None),
        ("bad image + large audio", p.bad_image, large, "image"),
        ("corrupt image + large audio", p.corrupt_image, large, "image"),
        ("good image + bad audio", p.image, p.bad_audio, "audio"),
        ("good image + corrupt audio", p.image, p.corrupt_audio, "audio"),
        ("bad image + corrupt audio", p.bad_image, p.corrupt_audio, "image"),
        ("good image + large audio", p.image, large, None),
    ]


TWO_MEDIA = [
    ("embed_image_audio", "grpc_stream"),
    ("embed_image_audio", "grpc"),
    ("embed_image_audio", "http"),
    ("chat_image_audio", "grpc_stream"),
    ("chat_image_audio", "http"),
]


def _sender(server: TritonServer, ensemble: str, protocol: str) -> Callable[[bytes, bytes], object]:
    if ensemble == "embed_image_audio":
        if protocol == "http":
            return lambda image, audio: embed_http(server.http_url, image, audio)
        return lambda image, audio: embed_grpc(server.grpc_url, image, audio, streaming=protocol == "grpc_stream")
    url, proto = (server.http_url, "http") if protocol == "http" else (server.grpc_url, "grpc")
    return lambda image, audio: chat(url, proto, image, audio)


@pytest.fixture(scope="module")
def baseline(rserver: TritonServer, payloads: Payloads) -> dict[str, object]:
    """Answers to the good requests, and the server's memory, after a warm-up of every path."""
    answers: dict[str, object] = {}
    for ensemble, protocol in TWO_MEDIA:
        send = _sender(rserver, ensemble, protocol)
        for _ in range(3):
            answers[f"{ensemble}/{protocol}"] = send(payloads.image, payloads.audio)
            answers[f"{ensemble}/{protocol}/large"] = send(payloads.image, large_clip(payloads, ensemble, protocol))
    wait_idle(rserver)
    answers["rss_mib"] = rss_mib(rserver.process.pid)
    return answers


def _same(a: object, b: object) -> bool:
    """Chat: identical greedy tokens. Embeddings: equal within FP16 noise (2e-3, as in the server tests),
    since a request batched with others goes through the encoders in a different batch."""
    if isinstance(a, tuple):
        return all(np.allclose(x.astype(np.float32), y.astype(np.float32), atol=2e-3, rtol=0) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize(("ensemble", "protocol"), TWO_MEDIA, ids=[f"{e}-{p}" for e, p in TWO_MEDIA])
def test_two_media_failures_leave_nothing_in_flight(
    rserver: TritonServer, payloads: Payloads, baseline: dict[str, object], ensemble: str, protocol: str
) -> None:
    send = _sender(rserver, ensemble, protocol)
    large = large_clip(payloads, ensemble, protocol)
    cases = mixed_cases(payloads, large)

    def run(job: tuple[str, bytes, bytes, str | None]) -> str | None:
        name, image, audio, bad = job
        try:
            answer = send(image, audio)
        except InvalidInputError as err:
            if bad is None:
                return f"{name}: unexpected error {err}"
            return None if f"input '{bad}'" in str(err) else f"{name}: error does not name '{bad}': {err}"
        except ClientError as err:
            return f"{name}: {type(err).__name__} instead of INVALID_ARGUMENT: {err}"
        if bad is not None:
            return f"{name}: succeeded but its {bad} is broken"
        key = f"{ensemble}/{protocol}" + ("/large" if audio is not payloads.audio else "")
        return None if _same(answer, baseline[key]) else f"{name}: answer differs from the warm-up answer"

    # Two rounds of the whole mix bring the server's buffers and allocators to their working
    # size; then 40 requests whose image is rejected while each carries the large clip (the
    # traffic that used to strand its request and payload); then the mix once more.
    failing = [("bad image + large audio", payloads.bad_image, large, "image"),
               ("corrupt image + large audio", payloads.corrupt_image, large, "image")]
    rounds = [
        list(itertools.islice(itertools.cycle(cases), 35)),
        list(itertools.islice(itertools.cycle(cases), 3, 38)),
        [failing[i % 2] for i in range(40)],
        list(itertools.islice(itertools.cycle(cases), 5, 40)),
    ]
    rss = []
    with ThreadPoolExecutor(8) as pool:
        for jobs in rounds:
            problems = [p for p in pool.map(run, jobs) if p]
            assert not problems, problems[:5]
            wait_idle(rserver)
            rss.append(rss_mib(rserver.process.pid))
    # Good requests of every kind still answer exactly, over every protocol.
    for other_ensemble, other_protocol in TWO_MEDIA:
        again = _sender(rserver, other_ensemble, other_protocol)(payloads.image, payloads.audio)
        assert _same(again, baseline[f"{other_ensemble}/{other_protocol}"]), (other_ensemble, other_protocol)
    LOGGER.info("%s over %s: RSS after each round %s MiB", ensemble, protocol, [round(r) for r in rss])
    growth = rss[2] - max(rss[:2])
    stranded = 40 * len(large) / 2**20
    assert growth < RSS_GROWTH_BOUND_MIB, (
        f"tritonserver grew by {growth:.0f} MiB over 40 rejected requests carrying {len(large) / 2**20:.1f} MB each "
        f"(RSS after each round {rss} MiB)"
    )
    LOGGER.info("growth %.0f MiB; stranding them would hold %.0f MiB", growth, stranded)


# ----------------------------------------------------------------------------- abandoned requests


def _close_grpc(url: str, after_tokens: int, image: bytes | None) -> int:
    """Start a long chat stream, read ``after_tokens`` tokens, then cancel the stream. Returns tokens read."""
    import queue

    import tritonclient.grpc as grpcclient

    values = request_values("Tell me a long story.", image, None, Sampling(max_tokens=128, ignore_eos=True), stream=True)
    model = "chat_image" if image is not None else "chat_text"
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    read = 0
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, grpc_inputs(values), request_id=uuid.uuid4().hex)
        while read < after_tokens:
            result, error = responses.get(timeout=60)
            assert error is None, error
            read += len(result.as_numpy("output_ids").reshape(-1))
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()
    return read


def _close_http(url: str, after_tokens: int, image: bytes | None) -> int:
    """The same over HTTP ``generate_stream``: the socket is closed after ``after_tokens`` events."""
    host, port = url.rsplit(":", 1)
    body = {"id": uuid.uuid4().hex, "text_input": "Tell me a long story.", "max_tokens": 128, "stream": True, "ignore_eos": True}
    model = "chat_text"
    if image is not None:
        body["image"] = list(image)
        model = "chat_image"
    data = json.dumps(body).encode()
    head = (
        f"POST /v2/models/{model}/generate_stream HTTP/1.1\r\nHost: {url}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    read = 0
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + data)
        buffer = b""
        while read < after_tokens:
            chunk = sock.recv(65536)
            assert chunk, "server closed the stream early"
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                line = event.split(b"data:", 1)
                if len(line) == 2:
                    payload = json.loads(line[1])
                    assert "error" not in payload, payload
                    read += len(payload["output_ids"]) if isinstance(payload["output_ids"], list) else 1
        # Closing here, mid-answer (or right after sending), drops the connection.
    return read


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cancellation_storm(rserver: TritonServer, payloads: Payloads, baseline: dict[str, object], protocol: str) -> None:
    closes, concurrency = 320, 32
    url = rserver.grpc_url if protocol == "grpc" else rserver.http_url
    close = _close_grpc if protocol == "grpc" else _close_http
    reference = ChatClient(rserver.grpc_url, timeout_s=60).generate("Hello there.", sampling=Sampling(max_tokens=8))
    # Before the first token, after one, after a few; every eighth with an image (closed between steps).
    plan = [(k, payloads.image if i % 8 == 0 else None) for i, k in zip(range(closes), itertools.cycle((0, 1, 3, 5)))]

    with ThreadPoolExecutor(concurrency) as pool:
        # A first, small storm brings the server's allocators to their working size.
        sum(pool.map(lambda job: close(url, *job), plan[:concurrency]))
        wait_idle(rserver, deadline_s=60)
        rss_before = rss_mib(rserver.process.pid)
        before_tokens = engine(rserver, "step_sequences_total")
        before_cancelled = engine(rserver, "requests_cancelled_total")
        read = sum(pool.map(lambda job: close(url, *job), plan))
    idle_s = wait_idle(rserver, deadline_s=60)
    generated = engine(rserver, "step_sequences_total") - before_tokens
    cancelled = engine(rserver, "requests_cancelled_total") - before_cancelled
    LOGGER.info(
        "%s storm: %d closes, %d tokens read, %d generated, %d cancelled, idle after %.1f s, RSS %.0f -> %.0f MiB",
        protocol, closes, read, generated, cancelled, idle_s, rss_before, rss_mib(rserver.process.pid),
    )
    # Without cancellation every request would run to its 128 tokens (40960 in all).
    bound = TOKENS_AFTER_CLOSE_BOUND[protocol]
    assert generated <= read + closes * bound, (
        f"{generated:.0f} tokens generated for {read} read by {closes} closed clients "
        f"(bound {bound} per close); idle after {idle_s:.1f} s"
    )
    # Requests closed before reaching the engine never enter it; every one that did is counted as cancelled.
    assert cancelled >= closes * 0.5, f"only {cancelled:.0f} of {closes} closes counted as cancellations"
    again = ChatClient(rserver.grpc_url, timeout_s=60).generate("Hello there.", sampling=Sampling(max_tokens=8))
    assert again.token_ids == reference.token_ids
    # A stranded request held ~0.6 MB in the server: 320 of them would add ~190 MiB.
    growth = rss_mib(rserver.process.pid) - rss_before
    assert growth < RSS_GROWTH_BOUND_MIB, f"tritonserver grew by {growth:.0f} MiB after {closes} closed streams"


def _probe(server: TritonServer, deadline_s: float) -> tuple[int, float, str]:
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "mmtriton.probe", "--url", server.grpc_url, "--deadline-s", str(deadline_s)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=deadline_s * 4 + 30,
    )
    return proc.returncode, time.monotonic() - start, proc.stderr


# ----------------------------------------------------------------------------- shutdown (last)


def test_shutdown_drains_in_time_and_leaves_nothing(rserver: TritonServer) -> None:
    wait_idle(rserver)
    proc = rserver.process
    start = time.monotonic()
    # SIGTERM by its own pid and wait here (not through stop(), which would kill stragglers).
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=EXIT_TIMEOUT_S + 10)
    took = time.monotonic() - start
    time.sleep(2.0)  # a stub whose server is gone exits within its watchdog's poll period
    left_processes = session_processes(proc.pid)
    left_shm = rserver.leftover_shm()
    rserver.stop()
    LOGGER.info("shutdown: exit code %s after %.1f s", code, took)
    log = rserver.log_path.read_text(errors="replace")
    stranded = re.findall(r"Model '(\w+)' \(version \d+\) has (\d+) in-flight inferences", log)
    assert not stranded, f"requests still in flight at shutdown: {stranded}"
    assert code == 0, f"tritonserver pid {proc.pid} exited with {code} after {took:.1f} s"
    assert took < EXIT_TIMEOUT_S, f"shutdown took {took:.1f} s (exit timeout {EXIT_TIMEOUT_S} s)"
    assert left_processes == [], f"processes left behind: {left_processes}"
    assert left_shm == [], f"shared-memory regions left behind: {left_shm}"


# ----------------------------------------------------------------------------- liveness


def test_liveness_probe_fails_on_a_wedged_server(cpu_repo: Path, tmp_path: Path) -> None:
    """A server of its own (only the probe's two ensembles): stopping a stub wedges its inference for good.

    (The python backend aborts the whole server when a stopped stub is resumed, so this
    server is not reused.)
    """
    deadline = 5.0
    srv = probe_server(cpu_repo, tmp_path / "server")
    with srv:
        code, _, err = _probe(srv, deadline)
        assert code == 0, err
        os.kill(stub_pid(srv, "image_preprocess"), signal.SIGSTOP)
        assert srv.is_ready(), "the readiness endpoint should still say ready: that is why it is not a liveness probe"
        code, took, err = _probe(srv, deadline)
        assert code == 1, err
        # The image request runs first: it times out at its deadline, or the python backend
        # reports the stopped stub as unhealthy sooner; either way within the deadline.
        assert "not live: embed_image" in err, err
        assert took < deadline + 10, f"the probe took {took:.1f} s with a {deadline:g} s deadline"
