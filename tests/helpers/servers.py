"""Starting real servers the project's way, and reading what they do: memory, metrics, idleness, embed requests."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from bench.triton_stats import parse_metrics
from clients.llm import grpc_inputs
from mmtriton.serving.server import TritonServer
from tests.conftest import ROOT


def make_server(repo: Path, work_dir: Path, **overrides: object) -> TritonServer:
    """A ``tritonserver`` for ``repo`` set up the project's way, not started: every test launch site uses this.

    Its python models import this checkout (``pythonpath``); ``overrides`` are any other
    :class:`TritonServer` fields (``exit_timeout_s``, ``extra_args``, ``ready_timeout_s``, ...).
    """
    return TritonServer(model_repository=Path(repo), work_dir=Path(work_dir), pythonpath=[ROOT], **overrides)


@contextlib.contextmanager
def running(server: TritonServer, label: str) -> Iterator[TritonServer]:
    """Start ``server``, yield it, and stop it by its pid; a test that stopped it itself (to inspect
    the shutdown) leaves nothing to do. Otherwise the log tail is shown, under ``label``."""
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            sys.stderr.write(f"\n--- {label} log ---\n{server.log_tail(60)}\n")
            server.stop()


def metrics(server: TritonServer) -> dict[str, float]:
    """Every sample on ``/metrics``, keyed by its full name with labels."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        return parse_metrics(resp.read().decode())


def engine(server: TritonServer, name: str) -> float:
    return metrics(server)[f'mmtriton_engine_{name}{{model="tensorrt_llm"}}']


def busy(server: TritonServer) -> dict[str, float]:
    """Everything that is not idle: Triton's pending requests per model, the engine's queue and batch."""
    m = metrics(server)
    out = {k: v for k, v in m.items() if k.startswith("nv_inference_pending_request_count") and v}
    for name in ("requests_in_flight", "requests_queued"):
        value = m[f'mmtriton_engine_{name}{{model="tensorrt_llm"}}']
        if value:
            out[name] = value
    return out


def wait_idle(server: TritonServer, deadline_s: float = 30.0) -> float:
    """Seconds until nothing is pending or running; fails with what is still busy.

    Idle must hold for two reads 0.5 s apart: the engine's gauges are refreshed every 0.2 s.
    """
    start = time.monotonic()
    quiet_since = None
    while True:
        left = busy(server)
        now = time.monotonic()
        if not left:
            quiet_since = quiet_since or now
            if now - quiet_since >= 0.5:
                return quiet_since - start
        else:
            quiet_since = None
        if left and now - start > deadline_s:
            pytest.fail(f"still busy {deadline_s:.0f} s after the traffic ended: {left}")
        time.sleep(0.2)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def embed_grpc(url: str, image: bytes, audio: bytes, streaming: bool) -> tuple[np.ndarray, np.ndarray]:
    """``embed_image_audio`` over plain gRPC or gRPC streaming; raises ClientError on an error."""
    import queue

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from clients.errors import from_triton_exception
    from clients.llm import stream_error

    values = {
        "image": np.frombuffer(image, dtype=np.uint8).reshape(1, -1),
        "audio": np.frombuffer(audio, dtype=np.uint8).reshape(1, -1),
    }
    client = grpcclient.InferenceServerClient(url)
    try:
        if not streaming:
            result = client.infer("embed_image_audio", grpc_inputs(values), client_timeout=60)
        else:
            responses: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: responses.put((result, error)))
            client.async_stream_infer("embed_image_audio", grpc_inputs(values), request_id=uuid.uuid4().hex)
            result, error = responses.get(timeout=60)
            if error is not None:
                raise stream_error(error)
        return result.as_numpy("image_embeddings"), result.as_numpy("audio_embeddings")
    except InferenceServerException as err:
        raise from_triton_exception(err) from None
    finally:
        if streaming:
            client.stop_stream()
        client.close()


def embed_http(url: str, image: bytes, audio: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``embed_image_audio`` over HTTP ``/infer`` with binary tensors."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from clients.errors import from_triton_exception

    inputs = []
    for name, data in (("image", image), ("audio", audio)):
        array = np.frombuffer(data, dtype=np.uint8).reshape(1, -1)
        tensor = httpclient.InferInput(name, list(array.shape), "UINT8")
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
    client = httpclient.InferenceServerClient(url, network_timeout=60)
    try:
        result = client.infer("embed_image_audio", inputs)
        return result.as_numpy("image_embeddings"), result.as_numpy("audio_embeddings")
    except InferenceServerException as err:
        raise from_triton_exception(err) from None
    finally:
        client.close()


def greedy_answers(reference: TritonServer, other: TritonServer, names: tuple[str, str]) -> dict[str, dict]:
    """The same greedy requests (text only; a PNG and a WAV) through two servers, 32 tokens each.

    Args:
        reference: The server the other is compared with.
        other: The server under test.
        names: How the two are named in the result (e.g. ``("cpu", "gpu-hf")``).

    Returns:
        Per request kind: each server's token ids, ``first_difference`` (the first index where
        they differ, or the length when they agree) and ``n`` (the other's token count).
    """
    from clients.llm import ChatClient, Sampling
    from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image

    # PNG decodes on the CPU under "mixed" too, so both sides start from identical pixels.
    image = encode_image(synthetic_image(640, 480, seed=5), "PNG")
    audio = encode_audio(synthetic_audio(16000, 2.0, seed=6), 16000, "WAV")
    first, second = ChatClient(reference.grpc_url), ChatClient(other.grpc_url)
    results = {}
    for kind, media in {"text": {}, "image+audio": {"image": image, "audio": audio}}.items():
        sampling = Sampling(max_tokens=32, ignore_eos=True)
        a = first.generate("Describe everything.", sampling=sampling, **media).token_ids
        b = second.generate("Describe everything.", sampling=sampling, **media).token_ids
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        results[kind] = {names[0]: a, names[1]: b, "first_difference": same, "n": len(b)}
    return results
