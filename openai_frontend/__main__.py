"""``python -m openai_frontend``: serve the OpenAI-compatible API in front of a Triton server."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from openai_frontend.app import create_app
from openai_frontend.config import FrontendConfig
from openai_frontend.fetch import FetchPolicy
from openai_frontend.server import HeaderDeadlineProtocol, listening_socket, serve

LOGGER = logging.getLogger("openai_frontend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; the defaults of the deadlines and fetch limits are those of the classes that use them.

    Args:
        argv: The arguments (None: ``sys.argv``).

    Returns:
        The parsed options.
    """
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
    parser.add_argument(
        "--fetch-timeout-s", type=float, default=FetchPolicy.timeout_s,
        help="deadline of one URL fetch, redirects included (default %(default)s)",
    )
    parser.add_argument(
        "--fetch-max-redirects", type=int, default=FetchPolicy.max_redirects, help="redirects followed per URL (default %(default)s)"
    )
    parser.add_argument(
        "--fetch-max-concurrent", type=int, default=FetchPolicy.max_concurrent,
        help="URL fetches running at once (default %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int,
        help="largest request body (default: derived from the bundle's media and prompt limits, see docs/openai.md)",
    )
    parser.add_argument(
        "--header-timeout-s", type=float, default=HeaderDeadlineProtocol.header_timeout_s,
        help="deadline for a request's headers (default %(default)s)",
    )
    parser.add_argument(
        "--body-timeout-s", type=float, default=FrontendConfig.body_timeout_s,
        help="deadline for a request's body (default %(default)s)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Serve the front door until SIGINT (Ctrl-C) or SIGTERM, which stop it cleanly (exit 0).

    Args:
        argv: The arguments (None: ``sys.argv``).
    """
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        policy = FetchPolicy(
            enabled=args.allow_url_fetch,
            allowed_hosts=frozenset(h.strip().lower() for h in args.url_allow_host if h.strip()),
            max_redirects=args.fetch_max_redirects,
            timeout_s=args.fetch_timeout_s,
            max_concurrent=args.fetch_max_concurrent,
        )
        config = FrontendConfig.from_bundle(
            args.bundle, args.triton_url, model_name=args.served_model_name, fetch=policy,
            metrics_on_api=args.metrics_port is None, max_body_bytes=args.max_body_bytes, body_timeout_s=args.body_timeout_s,
        )
        app = create_app(config)
        if args.metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(args.metrics_port, addr=args.host, registry=app.state.metrics.registry)
            LOGGER.info("metrics on http://%s:%d/metrics", args.host, args.metrics_port)
        sock = listening_socket(args.host, args.port)
    except KeyboardInterrupt:  # Ctrl-C before serving: nothing to shut down
        LOGGER.info("interrupted while starting; not serving")
        return
    port = sock.getsockname()[1]
    LOGGER.info("serving model %r on http://%s:%d/v1 for Triton at %s", config.model_name, args.host, port, args.triton_url)
    LOGGER.info(
        "limits: body %d bytes, prompt text %s bytes (%s input tokens x %s bytes per token), headers %g s, body %g s",
        config.body_limit, config.max_text_bytes, config.max_input_len, config.token_bytes,
        args.header_timeout_s, config.body_timeout_s,
    )
    if args.port_file:
        args.port_file.write_text(f"{port}\n")
    serve(app, sock, args.header_timeout_s, args.log_level)


if __name__ == "__main__":
    main()
