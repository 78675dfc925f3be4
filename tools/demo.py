"""The demo: start tritonserver on the CPU repository, stream one multimodal answer, stop.

``make demo`` runs this after building the tiny bundle and rendering the repository.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from clients.errors import ClientError
from clients.llm import ChatClient, Sampling
from mmtriton.serving.server import ServerError, TritonServer

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="rendered model repository")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--prompt", default="Describe the picture and answer the question in the recording.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--work-dir", type=Path, default=Path("build/demo-server"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = TritonServer(model_repository=args.repo, work_dir=args.work_dir, pythonpath=[ROOT])
    try:
        server.start()
    except ServerError as err:
        logging.error("%s", err)
        return 1
    try:
        client = ChatClient(server.grpc_url)
        print(f"\n> {args.prompt}  [image: {args.image}, audio: {args.audio}]\n")
        answer = client.generate(
            args.prompt,
            image=args.image.read_bytes(),
            audio=args.audio.read_bytes(),
            sampling=Sampling(max_tokens=args.max_tokens),
            on_chunk=lambda chunk: print(chunk.text, end="", flush=True),
        )
        print(
            f"\n\n{answer.num_input_tokens} prompt tokens (text + image + audio rows), "
            f"{answer.num_output_tokens} output tokens; TTFT {answer.ttft_s * 1000:.0f} ms, "
            f"{answer.tokens_per_s:.1f} tokens/s after the first.\n"
            "The tiny bundle has random weights: the text is not meaningful."
        )
    except ClientError as err:
        logging.error("request failed: %s\nserver log tail:\n%s", err, server.log_tail())
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
