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

from mmtriton.contract import embed_ensemble
from clients.errors import ClientError, from_triton_exception


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
        ClientError: Any other failure.
    """
    model = ensemble_for(image is not None, audio is not None)
    inputs, outputs = [], []
    if image is not None:
        inputs.append(_bytes_input("image", image))
        outputs.append("image_embeddings")
    if audio is not None:
        inputs.append(_bytes_input("audio", audio))
        outputs.append("audio_embeddings")
    client = grpcclient.InferenceServerClient(url)
    try:
        result = client.infer(
            model,
            inputs,
            outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
            client_timeout=timeout_s,
        )
    except InferenceServerException as err:
        raise from_triton_exception(err) from None
    finally:
        client.close()
    return {name: result.as_numpy(name)[0] for name in outputs}


def main(argv: list[str] | None = None) -> int:
    """CLI: print the shape and a few values of each embedding."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="localhost:8001", help="gRPC host:port")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--audio", type=Path)
    args = parser.parse_args(argv)
    try:
        result = embed(
            args.url,
            image=args.image.read_bytes() if args.image else None,
            audio=args.audio.read_bytes() if args.audio else None,
        )
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)  # noqa: T201 - CLI output
        return 1
    for name, value in result.items():
        head = np.array2string(value[0, :4].astype(np.float32), precision=4)
        print(f"{name}: shape {list(value.shape)} {value.dtype}, row 0 starts {head}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
