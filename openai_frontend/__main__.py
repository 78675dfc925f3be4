"""``python -m openai_frontend``: serve the OpenAI-compatible API in front of a Triton server."""

from __future__ import annotations

import argparse
import logging
import socket
from pathlib import Path

from openai_frontend.app import FrontendConfig, create_app
from openai_frontend.fetch import FetchPolicy

LOGGER = logging.getLogger("openai_frontend")


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
    )
    config = FrontendConfig.from_bundle(
        args.bundle, args.triton_url, model_name=args.served_model_name, fetch=policy,
        metrics_on_api=args.metrics_port is None,
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
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, access_log=False))
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
