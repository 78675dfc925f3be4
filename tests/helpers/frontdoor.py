"""The OpenAI front door in a process of its own, and loopback servers it is tested against."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT

START_TIMEOUT_S = 60.0


class FrontDoor:
    """``python -m openai_frontend`` in a process of its own, on a port it picks; stopped by its pid."""

    def __init__(self, triton_url: str, bundle: Path, work: Path, *extra: str, python: str = sys.executable) -> None:
        work.mkdir(parents=True, exist_ok=True)
        port_file = work / "port"
        port_file.unlink(missing_ok=True)
        self.log_path = work / "frontend.log"
        self.log = self.log_path.open("w")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(
            [python, "-m", "openai_frontend", "--triton-url", triton_url, "--bundle", str(bundle),
             "--port", "0", "--port-file", str(port_file), "--log-level", "debug", *extra],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        end = time.monotonic() + START_TIMEOUT_S
        while not port_file.exists() or not port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"front door did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"
        while True:
            try:
                httpx.get(f"{self.url}/v1/models", timeout=5).raise_for_status()
                break
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() > end:
                    self.stop()
                    raise RuntimeError(f"front door did not answer:\n{self.log_path.read_text()}") from None
                time.sleep(0.1)

    def metrics(self) -> dict[str, float]:
        from bench.triton_stats import parse_metrics

        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=10).text)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig`` to the process by its pid (unless it has ended) and wait; its exit code.

        A process still running 15 s later is killed (and its exit code says so).
        """
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()
        return self.process.returncode


#: Slack on top of a deadline for "refused within the deadline" (scheduling on a loaded 2-core machine).
DEADLINE_MARGIN_S = 2.5


class Listener:
    """A loopback TCP listener that records the connections it accepts and closes them."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class BodyServer:
    """A loopback HTTP server: ``/ok.png`` (small body), ``/big`` (streamed, no length),
    ``/declared`` (a Content-Length over any limit), ``/redirect?to=URL``. It counts the
    body bytes it managed to send."""

    def __init__(self, body: bytes = b"\x89PNG fake", big_total: int = 64 * 1024 * 1024) -> None:
        outer = self
        self.sent = 0
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                if self.path == "/ok.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", self.path.split("=", 1)[1])
                    self.end_headers()
                elif self.path == "/declared":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(big_total))
                    self.end_headers()
                    self._pump(big_total)
                else:  # /big: no Content-Length, the body just keeps coming
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.end_headers()
                    self._pump(big_total)

            def _pump(self, total: int) -> None:
                block = b"\0" * 65536
                try:
                    while outer.sent < total:
                        self.wfile.write(block)
                        outer.sent += len(block)
                except OSError:
                    pass  # the fetcher hung up: what the test wants to see

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.big_total = big_total
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class DripServer:
    """A loopback HTTP origin that sends one byte every ``interval_s``.

    ``/head`` drips its status line and headers (then the body); ``/body`` sends its
    headers at once and drips the body. Each answer is far longer than any deadline the
    tests use; :attr:`sent` counts the bytes sent per path, :attr:`connections` the
    connections accepted. :meth:`close` stops every drip and joins the threads.
    """

    HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"p" * 40 + b"\r\nContent-Length: 80\r\n\r\n"
    BODY = b"\x89PNG" + b"\0" * 76

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.sent: dict[str, int] = {}
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._threads: list[threading.Thread] = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _drip(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            path = conn.recv(65536).split(b" ")[1].decode()
            if path == "/body":
                conn.sendall(self.HEAD)
            data = self.BODY if path == "/body" else self.HEAD + self.BODY
            for i in range(len(data)):
                if self._stop.wait(self.interval_s if i else 0):
                    break
                conn.sendall(data[i : i + 1])
                with self._lock:
                    self.sent[path] = self.sent.get(path, 0) + 1
        except (OSError, IndexError):
            pass  # the fetcher hung up: what the tests want to see
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for thread in list(self._threads):
            thread.join(timeout=5)
        self.sock.close()
