"""A newcomer's first commands, run as they are typed: ``python -m tools.demo``, ``python -m clients ...``.

Each test runs the real command in a subprocess and checks what it writes and its
exit code: the demo says what it is doing while the server starts; model text
reaches the terminal with its control characters escaped; a missing file, a bad
``--url`` or no server at the address is one line (exit code 2 for a usage mistake,
1 for a failed request), never a traceback. All traffic stays on loopback.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from clients.errors import ServerUnavailableError
from clients.llm import ChatClient, Sampling
from clients.terminal import TextOutput, printable
from mmtriton.media.samples import write_samples
from mmtriton.serving.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]
# What a model's text may never put on a terminal raw: ESC (CSI, OSC), BEL, CR, backspace, DEL, the 8-bit CSI.
HOSTILE = [
    "\x1b[2J\x1b[H",
    "\x1b]0;owned\x07",
    "red: \x1b[31mX\x1b[0m",
    "\r\x08\x7f",
    "\x9b6n",
    "\u202eevil\x1b",
    "[1m",
]
RAW_FORBIDDEN = ("\x1b", "\x07", "\r", "\x08", "\x7f", "\x9b", "\u202e")


def run(args: list[str], cwd: Path = ROOT, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run ``python <args>`` with the project importable, as UTF-8, and return what it wrote."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
        check=False,
        **kwargs,
    )


def raw_controls(text: str) -> set[str]:
    """Control characters in ``text`` other than newline and tab."""
    return {c for c in text if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cs")} | (
        {c for c in text if c == "\u202e"}
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *expected: str) -> str:
    """The command failed with ``code`` and wrote exactly one stderr line holding ``expected``, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for part in expected:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``sample.jpg`` and ``sample.wav``, as ``make samples`` writes them."""
    return write_samples(tmp_path_factory.mktemp("samples"))


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens, held (bound, never listening) so nothing else takes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


class FakeTriton:
    """A loopback HTTP server answering ``generate_stream`` with given text pieces, as server-sent events.

    Args:
        pieces: The ``text_output`` of each event.
        stall_s: Seconds to wait after the first event (to interrupt a client mid-answer).
    """

    def __init__(self, pieces: list[str], stall_s: float = 0.0) -> None:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, piece in enumerate(pieces):
                    event = {"text_output": piece, "output_ids": [i], "num_input_tokens": 3, "num_output_tokens": i + 1}
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                    if i == 0 and stall_s:
                        time.sleep(stall_s)

            def log_message(self, *args: object) -> None:
                pass

        self.paths: list[str] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- 1 and 2: the demo -----------------------------------------------------------------------------


def test_demo_shows_progress_while_the_server_starts_and_escapes_the_answer(
    cpu_repo: Path, samples: tuple[Path, Path], tmp_path: Path
) -> None:
    """``make demo``'s command: a line when starting, lines while waiting, "ready in N s", a safe answer."""
    image, audio = samples
    cmd = [
        "-m",
        "tools.demo",
        "--repo",
        str(cpu_repo),
        "--image",
        str(image),
        "--audio",
        str(audio),
        "--work-dir",
        str(tmp_path / "demo-server"),
        "--progress-every",
        "1",
        "--max-tokens",
        "24",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *cmd],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
    )
    stamps: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: stamps.extend((time.monotonic() - started, line) for line in proc.stdout))
    reader.start()
    try:
        proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # the demo stops its server on Ctrl-C
        proc.wait(timeout=60)
        raise
    finally:
        reader.join(timeout=30)
    stderr = proc.stderr.read()
    out = "".join(line for _, line in stamps)
    assert proc.returncode == 0, (out, stderr)
    assert "Traceback" not in out + stderr
    lines = [line for _, line in stamps]
    first = lines[0]
    assert first.startswith("starting tritonserver on") and "models" in first, first
    assert stamps[0][0] < 5, "the first line comes at once, before the server is ready"
    waiting = [i for i, line in enumerate(lines) if line.startswith("  waiting for the server:")]
    ready = [i for i, line in enumerate(lines) if re.fullmatch(r"tritonserver ready in \d+ s .*\n", line)]
    assert waiting and len(ready) == 1, out
    assert 0 < waiting[0] and waiting[-1] < ready[0], out
    assert re.search(r"waiting for the server: \d+ s, \d+ of \d+ models loaded", out), out
    # The lines came while it waited, not all at the end.
    assert stamps[ready[0]][0] - stamps[waiting[0]][0] >= 0.5, stamps
    assert "output tokens; TTFT" in out
    assert not raw_controls(out), f"raw control characters on the terminal: {raw_controls(out)!r}"


def test_demo_missing_file_is_one_line_before_any_server_starts(cpu_repo: Path, tmp_path: Path) -> None:
    result = run(
        [
            "-m",
            "tools.demo",
            "--repo",
            str(cpu_repo),
            "--image",
            "cat.jpg",
            "--audio",
            "question.wav",
            "--work-dir",
            str(tmp_path / "w"),
        ],
        cwd=tmp_path,
        timeout=60,
    )
    assert_one_line_error(result, 2, "cat.jpg", "no such file")
    assert not (tmp_path / "w").exists(), "no server was started"


def test_chat_cli_escapes_control_characters_in_model_text() -> None:
    """The text of a (fake, loopback) server with ESC sequences and BEL reaches stdout escaped."""
    pieces = [*HOSTILE, "ok\ttab\nnext line: é 猫 🐱 \ufffd"]
    with FakeTriton(pieces) as fake:
        result = run(["-m", "clients", "chat", "--protocol", "http", "--url", fake.url, "Describe"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert fake.paths == ["/v2/models/chat_text/generate_stream"]
    for raw in RAW_FORBIDDEN:
        assert raw not in result.stdout, (raw, result.stdout)
    for shown in (
        "\\x1b[2J\\x1b[H",
        "\\x1b]0;owned\\x07",
        "\\x1b[31mX\\x1b[0m",
        "\\x0d\\x08\\x7f",
        "\\x9b6n",
        "\\u202eevil",
    ):
        assert shown in result.stdout, (shown, result.stdout)
    assert "ok\ttab\nnext line: é 猫 🐱 \ufffd\n" in result.stdout  # printable text, newlines and tabs stay
    assert "[3 prompt tokens, 8 output tokens" in result.stderr


def test_text_output_escapes_each_character_of_split_sequences() -> None:
    """A sequence split across streamed chunks is escaped all the same; printable text is untouched."""

    class Sink:
        encoding = "ascii"

        def __init__(self) -> None:
            self.data = ""

        def write(self, text: str) -> None:
            self.data += text

        def flush(self) -> None:
            pass

    sink = Sink()
    out = TextOutput(sink)  # type: ignore[arg-type]
    for piece in ["a\x1b", "[2", "J\x07", "\ud800é\n"]:
        out.write(piece)
    assert sink.data == "a\\x1b[2J\\x07\\ud800\\xe9\n"  # an ASCII terminal gets escapes, not an exception
    assert not out.mid_line
    assert printable("plain text\twith tab\nand 猫") == "plain text\twith tab\nand 猫"
    assert printable("\u2028\x00\x85") == "\\u2028\\x00\\x85"


def test_chat_cli_on_the_real_server_writes_no_raw_control_characters(
    server: TritonServer, samples: tuple[Path, Path]
) -> None:
    image, audio = samples
    result = run(
        [
            "-m",
            "clients",
            "chat",
            "--url",
            server.grpc_url,
            "--image",
            str(image),
            "--audio",
            str(audio),
            "--max-tokens",
            "48",
            "Describe the picture and answer the question in the recording.",
        ]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert not raw_controls(result.stdout), raw_controls(result.stdout)


# -- 3: files that do not exist -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "prog", "missing"),
    [
        (
            ["-m", "clients", "chat", "--image", "cat.jpg", "--audio", "question.wav", "Describe"],
            "clients chat",
            "cat.jpg",
        ),
        (["-m", "clients", "chat", "--audio", "question.wav", "Describe"], "clients chat", "question.wav"),
        (["-m", "clients", "embed", "--image", "cat.jpg", "--audio", "question.wav"], "clients embed", "cat.jpg"),
        (
            ["-m", "clients.embed", "--image", "cat.jpg", "--audio", "question.wav"],
            "python -m clients.embed",
            "cat.jpg",
        ),
        (["-m", "clients.embed", "--audio", "question.wav"], "python -m clients.embed", "question.wav"),
    ],
)
def test_missing_media_file_is_a_one_line_usage_error(
    tmp_path: Path, closed_port: int, args: list[str], prog: str, missing: str
) -> None:
    # The address has nothing behind it: the file is checked before anything is sent.
    result = run([*args, "--url", f"127.0.0.1:{closed_port}"], cwd=tmp_path, timeout=60)
    line = assert_one_line_error(result, 2, f"{prog}: error:", missing, "no such file")
    assert "could not reach" not in line


def test_a_folder_given_as_the_image_is_a_usage_error(tmp_path: Path) -> None:
    result = run(["-m", "clients", "chat", "--image", str(tmp_path), "Describe"], cwd=tmp_path, timeout=60)
    assert_one_line_error(result, 2, "clients chat: error:", str(tmp_path), "folder")


# -- 4 and 5: no server, a wrong port, a bad --url ------------------------------------------------


def test_make_chat_without_a_server_names_the_url(samples: tuple[Path, Path], closed_port: int) -> None:
    """``make chat``'s command with nothing listening: one line naming the address, exit code 1."""
    image, audio = samples
    url = f"localhost:{closed_port}"
    result = run(
        [
            "-m",
            "clients",
            "chat",
            "--url",
            url,
            "--image",
            str(image),
            "--audio",
            str(audio),
            "Describe the picture and answer the question in the recording.",
        ],
        timeout=60,
    )
    line = assert_one_line_error(result, 1, f"could not reach the server at {url} (gRPC)", "is `make serve` running?")
    assert "no longer in valid state" not in line
    assert result.stdout == ""


def test_grpc_client_without_a_server_always_names_the_url(closed_port: int) -> None:
    """The stream can fail before or after the request is queued (a race): either way the same typed error."""
    url = f"127.0.0.1:{closed_port}"
    client = ChatClient(url, timeout_s=30)
    for _ in range(10):
        with pytest.raises(ServerUnavailableError) as err:
            client.generate("Hello", sampling=Sampling(max_tokens=2))
        assert str(err.value).startswith(f"could not reach the server at {url} (gRPC): "), str(err.value)
        assert err.value.url == url and not err.value.connected


@pytest.mark.parametrize(
    ("args", "protocol"),
    [
        (["-m", "clients", "chat", "--protocol", "http", "Hello"], "HTTP"),
        (["-m", "clients", "embed"], "gRPC"),
        (["-m", "clients.embed"], "gRPC"),
    ],
)
def test_unreachable_server_is_one_line_naming_the_url(
    samples: tuple[Path, Path], closed_port: int, args: list[str], protocol: str
) -> None:
    url = f"127.0.0.1:{closed_port}"
    media = ["--image", str(samples[0])] if "embed" in " ".join(args) else []
    result = run([*args, *media, "--url", url], timeout=60)
    assert_one_line_error(result, 1, f"could not reach the server at {url} ({protocol})", "is `make serve` running?")


def test_the_wrong_port_says_which_port_it_may_be(server: TritonServer) -> None:
    """HTTP to the gRPC port and gRPC to the HTTP port: one line each, with a hint, no "make serve"."""
    http_to_grpc = run(["-m", "clients", "chat", "--protocol", "http", "--url", server.grpc_url, "Hello"], timeout=60)
    line = assert_one_line_error(http_to_grpc, 1, server.grpc_url, "is that the gRPC port?")
    assert "make serve" not in line
    grpc_to_http = run(["-m", "clients", "chat", "--url", server.http_url, "Hello"], timeout=60)
    line = assert_one_line_error(grpc_to_http, 1, f"could not reach the server at {server.http_url}", "HTTP port")
    assert "make serve" not in line


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("http://localhost:8001", "grpc", "without 'http://'"),
        ("localhost:abc", "grpc", "the port must be a number"),
        ("localhost:abc", "http", "the port must be a number"),
        ("localhost:99999", "http", "the port must be a number"),
        ("localhost", "grpc", "has no port"),
        ("", "grpc", "empty"),
        ("local host:8000", "http", "give host:port"),
        ("https://localhost:8000", "http", "plain HTTP"),
    ],
)
def test_bad_url_is_a_one_line_usage_error(url: str, protocol: str, expected: str) -> None:
    result = run(["-m", "clients", "chat", "--protocol", protocol, f"--url={url}", "Hello"], timeout=60)
    assert_one_line_error(result, 2, "clients chat: error: --url:", expected)
    result = (
        run(["-m", "clients.embed", f"--url={url}", "--image", __file__], timeout=60) if protocol == "grpc" else None
    )
    if result is not None:
        assert_one_line_error(result, 2, "python -m clients.embed: error: --url:", expected)


def test_http_url_with_scheme_is_accepted() -> None:
    with FakeTriton(["hi"]) as fake:
        result = run(
            ["-m", "clients", "chat", "--protocol", "http", "--url", f"http://{fake.url}/", "Hello"], timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hi\n"


def test_ctrl_c_mid_answer_ends_without_a_traceback() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONIOENCODING": "utf-8"}
    with FakeTriton(["first ", "second"], stall_s=30) as fake:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "clients", "chat", "--protocol", "http", "--url", fake.url, "Hello"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
        )
        try:
            assert proc.stdout.read(len("first ")) == "first "
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 130, (out, err)
    assert err.strip() == "interrupted" and "Traceback" not in err
