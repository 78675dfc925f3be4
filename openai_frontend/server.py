"""uvicorn serving the front door: a deadline for request headers, and a clean stop.

- :class:`HeaderDeadlineProtocol`: uvicorn's h11 protocol with a deadline for each
  request's line and headers (uvicorn has none), and invalid HTTP answered with the OpenAI
  error body.
- :class:`CleanStopServer`: SIGINT (Ctrl-C) and SIGTERM start uvicorn's graceful shutdown
  (open requests are answered, then the lifespan closes the Triton channels), log one
  line, and the process exits 0. A second signal stops without waiting for open requests.
- :func:`serve`: listen on a socket bound before uvicorn starts (so ``--port 0`` can be
  reported) and serve until stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from openai_frontend.errors import APIError

LOGGER = logging.getLogger("openai_frontend")

#: The signals that stop the front door cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's line and headers.

    uvicorn has no such option: its keep-alive timeout is reset by every byte, so a client
    that sends its headers a byte at a time holds a connection forever. Here a timer starts
    when the connection is made and again after each response (the next request on a
    kept-alive connection); it is cancelled once h11 has parsed a whole request line and
    its headers. When it fires first, the connection is closed, with a 408 when part of a
    request had arrived (an idle kept-alive connection is just closed). Invalid
    HTTP gets the OpenAI error body instead of uvicorn's plain text.

    Set :attr:`header_timeout_s` on a subclass (:func:`protocol_with_header_deadline`).
    """

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the deadline for the first request's headers."""
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        """Parse what arrived; a new request (its headers are whole) cancels the deadline."""
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        """Start the deadline for the next request's headers (before a pipelined one is parsed)."""
        if not self.transport.is_closing():
            self._arm_header_deadline()
        super().on_response_complete()

    def send_400_response(self, msg: str) -> None:
        """Answer invalid HTTP (bad request line, headers over h11's size limit) with an OpenAI error body."""
        body = APIError(400, f"invalid HTTP request: {msg}", None, "invalid_http").body_bytes()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        response = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
        for event in (response, h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return  # gone already, or a request is being answered
        if not self.conn.trailing_data[0]:
            self.transport.close()  # idle between requests: nothing was asked, nothing to answer
            return
        LOGGER.info("closing connection from %s: no whole request headers within %g s", self.client, self.header_timeout_s)
        err = APIError(408, f"the request headers were not received within {self.header_timeout_s:g} s", None, "header_timeout")
        body = err.body_bytes()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode() + body
        )
        self.transport.close()


def protocol_with_header_deadline(timeout_s: float) -> type[HeaderDeadlineProtocol]:
    """A :class:`HeaderDeadlineProtocol` class whose header deadline is ``timeout_s`` (for ``uvicorn.Config(http=...)``).

    Args:
        timeout_s: The deadline in seconds.

    Returns:
        The protocol class.
    """
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s})


class CleanStopServer(uvicorn.Server):
    """A uvicorn server that SIGINT and SIGTERM stop cleanly: graceful shutdown, one log line, exit 0.

    uvicorn's own handlers raise the signal again once it has shut down, so that whatever
    ran it learns of the signal: for ``python -m`` that is a ``KeyboardInterrupt``
    traceback after Ctrl-C and death by the signal after SIGTERM. This server takes the
    two signals itself while it serves, and gives the previous handlers back after.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Handle :data:`STOP_SIGNALS` with :meth:`stop` while serving (uvicorn calls this around ``serve``)."""
        previous = {sig: signal.signal(sig, self.stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop(self, sig: int, frame: FrameType | None = None) -> None:
        """A stop signal: the first starts the graceful shutdown, a second ends the wait for open requests.

        Args:
            sig: The signal.
            frame: Unused (a signal handler's second argument).
        """
        name = signal.Signals(sig).name
        if self.should_exit:
            self.force_exit = True
            LOGGER.info("%s again: stopping without waiting for open requests", name)
            return
        self.should_exit = True
        LOGGER.info("%s: stopping after the open requests are answered (again to stop at once)", name)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening (port 0: a free one).

    Args:
        host: The address (IPv6 when it has a ``:``).
        port: The port, or 0.

    Returns:
        The socket; connections wait in its backlog until uvicorn accepts them.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(app: Any, sock: socket.socket, header_timeout_s: float, log_level: str) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM (:class:`CleanStopServer`).

    Args:
        app: The ASGI application.
        sock: From :func:`listening_socket`.
        header_timeout_s: The deadline for each request's headers.
        log_level: uvicorn's log level.
    """
    protocol = protocol_with_header_deadline(header_timeout_s)
    server = CleanStopServer(uvicorn.Config(app, log_level=log_level, access_log=False, http=protocol))
    server.run(sockets=[sock])
