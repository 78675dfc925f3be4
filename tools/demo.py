"""The demo: start tritonserver on the CPU repository, stream one multimodal answer, stop.

``make demo`` runs this after building the tiny bundle and rendering the repository.
The server takes a while to load its models (10-30 s on a CPU); the demo says
so when it starts, writes a line every few seconds while it waits (with how many
models are loaded), and how long the start took. The answer is written through
:class:`clients.terminal.TextOutput`: the random model's text holds control
characters and escape sequences, shown as visible escapes (``\\x1b``), never sent
raw to the terminal.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO

from clients.cli import UsageError, client_error, interrupted, read_input, usage_error
from clients.errors import ClientError
from clients.llm import ChatClient, Sampling
from clients.terminal import TextOutput, printable
from mmtriton.serving.server import ServerError, TritonServer

ROOT = Path(__file__).resolve().parent.parent
PROG = "python -m tools.demo"
LOGGER = logging.getLogger("tools.demo")
LOADED_MARK = "successfully loaded '"  # Triton's log line for each model that finished loading


def model_count(repo: Path) -> int:
    """Number of models in a rendered repository (folders with a ``config.pbtxt``)."""
    return sum(1 for config in repo.glob("*/config.pbtxt"))


def loaded_count(log_path: Path) -> int:
    """Number of models the server log reports loaded so far (0 before the log exists)."""
    try:
        return log_path.read_text(errors="replace").count(LOADED_MARK)
    except OSError:
        return 0


class StartProgress:
    """Writes a line every ``every_s`` seconds while a server starts, from a thread of its own.

    Use as a context manager around :meth:`TritonServer.start`; :attr:`elapsed_s` is
    the time since entering.

    Args:
        server: The server being started (its log is read for the models loaded).
        total_models: Models in its repository (0: not shown).
        out: Where the lines go.
        every_s: Seconds between lines.
    """

    def __init__(self, server: TritonServer, total_models: int, out: TextIO, every_s: float = 3.0) -> None:
        self.server = server
        self.total_models = total_models
        self.out = out
        self.every_s = every_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="start-progress", daemon=True)
        self._started = 0.0

    @property
    def elapsed_s(self) -> float:
        """Seconds since the start began."""
        return time.monotonic() - self._started

    def line(self) -> str:
        """The progress line for now, e.g. ``waiting for the server: 6 s, 9 of 15 models loaded``."""
        text = f"  waiting for the server: {self.elapsed_s:.0f} s"
        if self.total_models:
            loaded = min(loaded_count(self.server.log_path), self.total_models)
            text += f", {loaded} of {self.total_models} models loaded"
        return text

    def _run(self) -> None:
        while not self._done.wait(self.every_s):
            self.out.write(self.line() + "\n")
            self.out.flush()

    def __enter__(self) -> Self:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._done.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> int:
    """Run the demo.

    Args:
        argv: The arguments (default ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 1 when the server or the request failed, 2 for a usage
        mistake (a file that cannot be read, no repository), 130 on Ctrl-C.
    """
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="rendered model repository")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--audio", type=Path, required=True)
    parser.add_argument("--prompt", default="Describe the picture and answer the question in the recording.")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--work-dir", type=Path, default=Path("build/demo-server"))
    parser.add_argument(
        "--progress-every",
        type=float,
        default=3.0,
        metavar="S",
        help="seconds between the progress lines while the server starts",
    )
    parser.add_argument("--verbose", action="store_true", help="also show the server module's log lines")
    args = parser.parse_args(argv)
    try:
        image = read_input(args.image, "--image")
        audio = read_input(args.audio, "--audio")
    except UsageError as err:
        return usage_error(PROG, str(err))
    total = model_count(args.repo) if args.repo.is_dir() else 0
    if not total:
        return usage_error(PROG, f"--repo {args.repo}: no rendered model repository there (run `make build-engines`)")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    out = sys.stdout
    server = TritonServer(model_repository=args.repo, work_dir=args.work_dir, pythonpath=[ROOT])
    out.write(
        f"starting tritonserver on {args.repo} (loading {total} models takes 10-30 s on a CPU; log {server.log_path})\n"
    )
    out.flush()
    progress = StartProgress(server, total, out, every_s=args.progress_every)
    try:
        with progress:
            server.start()
    except ServerError as err:
        LOGGER.error("tritonserver did not start (after %.0f s): %s", progress.elapsed_s, err)
        return 1
    except KeyboardInterrupt:  # start() has stopped the process it started
        return interrupted()
    out.write(f"tritonserver ready in {progress.elapsed_s:.0f} s (HTTP {server.http_url}, gRPC {server.grpc_url})\n")
    text = TextOutput(out)
    try:
        client = ChatClient(server.grpc_url)
        out.write(
            f"\n> {printable(args.prompt)}  [image: {printable(str(args.image))}, audio: {printable(str(args.audio))}]\n\n"
        )
        answer = client.generate(
            args.prompt,
            image=image,
            audio=audio,
            sampling=Sampling(max_tokens=args.max_tokens),
            on_chunk=lambda chunk: text.write(chunk.text),
        )
        text.end_line()
        out.write(
            f"\n{answer.num_input_tokens} prompt tokens (text + image + audio rows), "
            f"{answer.num_output_tokens} output tokens; TTFT {answer.ttft_s * 1000:.0f} ms, "
            f"{answer.tokens_per_s:.1f} tokens/s after the first.\n"
            "The tiny bundle has random weights: the text is not meaningful "
            "(control characters in it are shown as escapes such as \\x1b).\n"
        )
        out.flush()
    except ClientError as err:
        text.end_line()
        code = client_error(err, PROG)
        sys.stderr.write(f"server log tail ({server.log_path}):\n{server.log_tail()}\n")
        return code
    except KeyboardInterrupt:
        text.end_line()
        return interrupted()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
