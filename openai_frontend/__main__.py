"""``python -m openai_frontend``: serve the OpenAI-compatible API in front of a Triton server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from openai_frontend.app import FrontendConfig, create_app
from openai_frontend.errors import APIError
from openai_frontend.fetch import FetchPolicy

LOGGER = logging.getLogger("openai_frontend")


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
    """A :class:`HeaderDeadlineProtocol` class whose header deadline is ``timeout_s`` (for ``uvicorn.Config(http=...)``)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": timeout_s})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m openai_frontend", description=__doc__)
    parser.add_argument("--triton-url", default="localhost:8001", help="Triton gRPC host:port (default %(default)s)")
    parser.add_argument("--bundle", type=Path, required=True, help="the model bundle (limits and model name from its bundle.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on; 0 picks a free one (default %(default)s)")
    parser.add_argument(
        "--metrics-port", type=int,
        help="serve /metrics on this port instead of the API port (so a network policy can keep it to monitoring)",
    )
    parser.add_argument("--port-file", type=Path, help="write the port listened on here once listening (for --port 0)")
    parser.add_argument("--served-model-name", help="model id under /v1/models and in responses (default: the bundle's spec name)")
    parser.add_argument("--allow-url-fetch", action="store_true", help="fetch http(s) image_url URLs (off by default)")
    parser.add_argument(
        "--url-allow-host", action="append", default=[], metavar="HOST",
        help="a host that may be fetched (repeat); an IP literal also allows that one private/loopback address",
    )
    parser.add_argument("--fetch-timeout-s", type=float, default=10.0, help="deadline of one URL fetch, redirects included")
    parser.add_argument("--fetch-max-redirects", type=int, default=3, help="redirects followed per URL")
    parser.add_argument("--fetch-max-concurrent", type=int, default=8, help="URL fetches running at once (default %(default)s)")
    parser.add_argument(
        "--max-body-bytes", type=int,
        help="largest request body (default: derived from the bundle's media and prompt limits, see docs/openai.md)",
    )
    parser.add_argument("--header-timeout-s", type=float, default=10.0, help="deadline for a request's headers (default %(default)s)")
    parser.add_argument("--body-timeout-s", type=float, default=30.0, help="deadline for a request's body (default %(default)s)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start uvicorn on the front door until interrupted."""
    import uvicorn

    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    policy = FetchPolicy(
        enabled=args.allow_url_fetch,
        allowed_hosts=frozenset(h.strip().lower() for h in args.url_allow_host if h.strip()),
        max_redirects=args.fetch_max_redirects,
        timeout_s=args.fetch_timeout_s,
        max_concurrent=args.fetch_max_concurrent,
    )
    extra: dict[str, Any] = {"max_body_bytes": args.max_body_bytes, "body_timeout_s": args.body_timeout_s}
    config = FrontendConfig.from_bundle(
        args.bundle, args.triton_url, model_name=args.served_model_name, fetch=policy,
        metrics_on_api=args.metrics_port is None, **extra,
    )
    app = create_app(config)
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.host, registry=app.state.metrics.registry)
        LOGGER.info("metrics on http://%s:%d/metrics", args.host, args.metrics_port)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    port = sock.getsockname()[1]
    LOGGER.info("serving model %r on http://%s:%d/v1 for Triton at %s", config.model_name, args.host, port, args.triton_url)
    LOGGER.info(
        "limits: body %d bytes, prompt text %s bytes (%s input tokens x %s bytes per token), headers %g s, body %g s",
        config.body_limit, config.max_text_bytes, config.max_input_len, config.token_bytes,
        args.header_timeout_s, config.body_timeout_s,
    )
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    protocol = protocol_with_header_deadline(args.header_timeout_s)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False, http=protocol))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
