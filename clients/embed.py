"""Send raw image and/or audio bytes through the ``embed_*`` ensembles over gRPC.

Example (with ``make serve`` running)::

    python -m clients.embed --image build/samples/sample.jpg --audio build/samples/sample.wav

The ensemble is chosen from the inputs given: ``embed_image``, ``embed_audio``
or ``embed_image_audio``. Nothing is decoded on the client.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from clients.address import server_address
from clients.cli import UsageError, client_error, interrupted, read_input, usage_error
from clients.errors import ClientError, from_triton_exception
from mmtriton.contract import AUDIO, AUDIO_EMBEDDINGS, IMAGE, IMAGE_EMBEDDINGS, embed_ensemble


def ensemble_for(has_image: bool, has_audio: bool) -> str:
    """Name of the embedding ensemble that takes exactly these inputs."""
    try:
        return embed_ensemble(has_image, has_audio)
    except ValueError:
        raise ClientError("give an image, an audio clip, or both") from None


def _bytes_input(name: str, data: bytes) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, [1, len(data)], "UINT8")
    tensor.set_data_from_numpy(np.frombuffer(data, dtype=np.uint8).reshape(1, -1))
    return tensor


def embed(
    url: str, *, image: bytes | None = None, audio: bytes | None = None, timeout_s: float = 60.0
) -> dict[str, np.ndarray]:
    """Embed raw image and/or audio bytes on the server.

    Args:
        url: gRPC ``host:port``.
        image: Encoded JPEG/PNG/WebP bytes.
        audio: Encoded WAV/FLAC/OGG bytes.
        timeout_s: Request timeout.

    Returns:
        ``image_embeddings`` and/or ``audio_embeddings`` as FP16 ``[rows, hidden]``.

    Raises:
        InvalidInputError: The server rejected an input (the message names it and the limit).
        InvalidURLError: ``url`` is not ``host:port``.
        ServerUnavailableError: The server cannot be reached (the message names ``url``).
        ClientError: Any other failure.
    """
    url = server_address(url, "grpc")
    model = ensemble_for(image is not None, audio is not None)
    inputs, outputs = [], []
    if image is not None:
        inputs.append(_bytes_input(IMAGE, image))
        outputs.append(IMAGE_EMBEDDINGS)
    if audio is not None:
        inputs.append(_bytes_input(AUDIO, audio))
        outputs.append(AUDIO_EMBEDDINGS)
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(
            model,
            inputs,
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            client_timeout=timeout_s,
        )
    except InferenceServerException as err:
        raise from_triton_exception(err, url=url) from None
    finally:
        client.close()
    return {name: result.as_numpy(name)[0] for name in outputs}


PROG = "python -m clients.embed"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """CLI: print the shape and a few values of each embedding.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).
        prog: The program name in messages.

    Returns:
        The exit code: 0, 1 when the request failed, 2 for a usage mistake.
    """
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--audio", type=Path)
    args = parser.parse_args(argv)
    if args.image is None and args.audio is None:
        return usage_error(prog, "give --image, --audio or both")
    try:
        image = read_input(args.image, "--image")
        audio = read_input(args.audio, "--audio")
    except UsageError as err:
        return usage_error(prog, str(err))
    try:
        result = embed(args.url, image=image, audio=audio)
    except ClientError as err:
        return client_error(err, prog)
    except KeyboardInterrupt:
        return interrupted()
    for name, value in result.items():
        head = np.array2string(value[0, :4].astype(np.float32), precision=4)
        sys.stdout.write(f"{name}: shape {list(value.shape)} {value.dtype}, row 0 starts {head}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
