"""Command line: ``python -m clients chat|embed ...``.

Examples::

    python -m clients chat --image cat.jpg --audio question.wav "Describe this"
    python -m clients chat --url localhost:8000 --protocol http "Hello"
    python -m clients embed --image cat.jpg --audio question.wav
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.cli import UsageError, client_error, interrupted, read_input, usage_error
from clients.errors import ClientError
from clients.terminal import TextOutput

PROG = "clients"


def _chat(args: argparse.Namespace, out: TextOutput) -> int:
    from clients.llm import ChatClient, Sampling

    image = read_input(args.image, "--image")
    audio = read_input(args.audio, "--audio")
    client = ChatClient(args.url, protocol=args.protocol)
    sampling = Sampling(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_words=tuple(args.stop or ()),
    )
    answer = client.generate(
        args.prompt,
        image=image,
        audio=audio,
        sampling=sampling,
        stream=not args.no_stream,
        on_chunk=lambda chunk: out.write(chunk.text),
    )
    out.end_line()
    sys.stderr.write(
        f"[{answer.num_input_tokens} prompt tokens, {answer.num_output_tokens} output tokens, "
        f"TTFT {answer.ttft_s * 1000:.0f} ms, {answer.tokens_per_s:.1f} tokens/s]\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the CLI.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 1 when the request failed, 2 for a usage mistake, 130 on Ctrl-C.
    """
    parser = argparse.ArgumentParser(prog=PROG, description="Clients for the multimodal Triton server")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="stream an answer to a prompt with an optional image and audio clip")
    chat.add_argument("prompt")
    chat.add_argument("--image", type=Path, help="JPEG/PNG/WebP file, sent as raw bytes")
    chat.add_argument("--audio", type=Path, help="WAV/FLAC/OGG file, sent as raw bytes")
    chat.add_argument("--url", default="localhost:8001", help="gRPC host:port (HTTP: host:8000 with --protocol http)")
    chat.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    chat.add_argument("--max-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--top-k", type=int)
    chat.add_argument("--top-p", type=float)
    chat.add_argument("--seed", type=int)
    chat.add_argument("--stop", action="append", help="stop string (repeatable)")
    chat.add_argument("--no-stream", action="store_true", help="one response with the whole answer")
    embed = sub.add_parser("embed", help="print the embeddings of an image and/or audio clip")
    embed.add_argument("--url", default="localhost:8001")
    embed.add_argument("--image", type=Path)
    embed.add_argument("--audio", type=Path)
    args = parser.parse_args(argv)
    prog = f"{PROG} {args.command}"
    if args.command == "embed":
        from clients.embed import main as embed_main

        forwarded = ["--url", args.url]
        forwarded += ["--image", str(args.image)] if args.image else []
        forwarded += ["--audio", str(args.audio)] if args.audio else []
        return embed_main(forwarded, prog=prog)
    out = TextOutput(sys.stdout)
    try:
        return _chat(args, out)
    except UsageError as err:
        return usage_error(prog, str(err))
    except ClientError as err:
        out.end_line()  # an error after part of the answer starts on a line of its own
        return client_error(err, prog)
    except KeyboardInterrupt:
        out.end_line()
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
