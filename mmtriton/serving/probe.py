"""Liveness probe that runs real inference: ``python -m mmtriton.probe --url localhost:8001``.

``/v2/health/ready`` only says the models are loaded. A server whose inference is
stuck (a wedged scheduler, a stalled python backend stub) still answers it with
200. This probe sends two small real requests, each under a deadline:

1. ``embed_image`` over plain (unary) gRPC with a 16x16 PNG made in memory:
   image decoding, the vision encoder and the non-streaming gRPC path;
2. ``chat_text`` over gRPC streaming with ``max_tokens`` 1: preprocessing, the
   LLM engine, postprocessing and the streaming path.

It exits 0 when both answer in time, 1 otherwise (the reason on stderr). It needs
only ``tritonclient[grpc]`` and numpy, so it runs inside the serving image (the
compose healthcheck) or as a Kubernetes ``exec`` liveness probe.
"""

from __future__ import annotations

import argparse
import logging
import queue
import struct
import sys
import time
import uuid
import zlib

import numpy as np

LOGGER = logging.getLogger(__name__)


class ProbeFailed(RuntimeError):
    """The server did not answer a real inference correctly in time."""


def tiny_png(size: int = 16) -> bytes:
    """An RGB PNG of ``size`` x ``size`` pixels (a gradient), built without an imaging library."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ramp = (np.arange(size, dtype=np.uint16) * 255 // max(size - 1, 1)).astype(np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, ::-1]), axis=-1)
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def probe_embed(url: str, deadline_s: float) -> None:
    """Unary gRPC inference on ``embed_image``.

    Raises:
        ProbeFailed: Error, timeout, or embeddings that are empty or not finite.
    """
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    payload = np.frombuffer(tiny_png(), dtype=np.uint8).reshape(1, -1)
    tensor = grpcclient.InferInput("image", list(payload.shape), "UINT8")
    tensor.set_data_from_numpy(payload)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer("embed_image", [tensor], client_timeout=deadline_s)
    except InferenceServerException as err:
        raise ProbeFailed(f"embed_image over gRPC: {err}") from None
    finally:
        client.close()
    emb = result.as_numpy("image_embeddings")
    if emb is None or emb.size == 0 or not np.isfinite(emb.astype(np.float32)).all():
        raise ProbeFailed("embed_image returned no finite embeddings")


def probe_chat(url: str, deadline_s: float) -> None:
    """One streamed token from ``chat_text``.

    Raises:
        ProbeFailed: Error, or no final response before the deadline.
    """
    import tritonclient.grpc as grpcclient

    values = {
        "text_input": np.array([[b"ping"]], dtype=np.object_),
        "max_tokens": np.array([[1]], dtype=np.int32),
        "stream": np.array([[True]], dtype=bool),
    }
    dtypes = {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL"}
    inputs = []
    for name, value in values.items():
        tensor = grpcclient.InferInput(name, list(value.shape), dtypes[name])
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    end = time.monotonic() + deadline_s
    finished = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=deadline_s)
        client.async_stream_infer(
            "chat_text", inputs, request_id=f"probe-{uuid.uuid4().hex}", enable_empty_final_response=True
        )
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ProbeFailed(f"chat_text gave no final response within {deadline_s:g} s")
            try:
                result, error = responses.get(timeout=left)
            except queue.Empty:
                raise ProbeFailed(f"chat_text gave no final response within {deadline_s:g} s") from None
            if error is not None:
                raise ProbeFailed(f"chat_text over gRPC streaming: {error}")
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                finished = True
                return
    finally:
        # Cancel only an unfinished request (a cancellation right after the last response can
        # leave the request referenced in Triton 2.51; see clients/llm.py).
        client.stop_stream(cancel_requests=not finished)
        client.close()


def probe(url: str, deadline_s: float = 10.0) -> float:
    """Run both checks; the deadline applies to each.

    Returns:
        Seconds both took together.

    Raises:
        ProbeFailed: A check failed or ran out of time.
    """
    start = time.monotonic()
    probe_embed(url, deadline_s)
    probe_chat(url, deadline_s)
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    """CLI: exit 0 when the server answers real inference in time, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--deadline-s", type=float, default=10.0, help="time allowed for each request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        took = probe(args.url, args.deadline_s)
    except ProbeFailed as err:
        LOGGER.error("not live: %s", err)
        return 1
    except Exception as err:  # noqa: BLE001 - any failure to talk to the server is "not live"
        LOGGER.error("not live: %s: %s", type(err).__name__, err)
        return 1
    LOGGER.info("live: real inference answered in %.2f s", took)
    return 0


if __name__ == "__main__":
    sys.exit(main())
