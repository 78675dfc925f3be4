"""The server address a client is given: ``host:port``, checked before anything is sent.

A mistyped address otherwise surfaces deep inside the HTTP or gRPC library
(``nonnumeric port``, ``Misformatted domain name``, or gRPC's "The stream is no
longer in valid state"); here it is refused up front with a message that says
what is wrong. The HTTP client also takes ``http://host:port`` (the scheme is
dropped); gRPC targets in gRPC's own resolver syntax (``dns:``, ``unix:``,
``ipv4:``, ``ipv6:``) are passed through unchecked.
"""

from __future__ import annotations

from clients.errors import InvalidURLError

_GRPC_RESOLVERS = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def server_address(url: str, protocol: str = "grpc") -> str:
    """Check a server address and return it as the client libraries take it.

    Args:
        url: ``host:port`` (``localhost:8001``, ``127.0.0.1:8000``, ``[::1]:8001``);
            with ``protocol="http"`` also ``http://host:port``.
        protocol: ``grpc`` or ``http``.

    Returns:
        ``host:port`` (for gRPC, a resolver target unchanged).

    Raises:
        InvalidURLError: The address is not ``host:port`` with a port in 1..65535;
            the message says what is wrong.
    """
    text = url.strip()
    if protocol == "grpc" and text.lower().startswith(_GRPC_RESOLVERS):
        return text
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if protocol == "http" and scheme.lower() == "http":
            text = rest.rstrip("/")
        elif scheme.lower() == "https":
            raise InvalidURLError(f"server address {url!r}: the clients speak plain HTTP and gRPC; give host:port")
        else:
            hint = "; for HTTP, use the http protocol (--protocol http)" if scheme.lower() == "http" else ""
            raise InvalidURLError(f"server address {url!r}: give host:port without '{scheme}://'{hint}")
    if not text:
        raise InvalidURLError("server address is empty: give host:port, e.g. localhost:8001")
    if any(c.isspace() or not c.isprintable() for c in text) or "/" in text or "@" in text:
        raise InvalidURLError(f"server address {url!r}: give host:port, e.g. localhost:8001")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise InvalidURLError(f"server address {url!r} has no port: give host:port, e.g. localhost:8001")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise InvalidURLError(f"server address {url!r}: write an IPv6 host in brackets, e.g. [::1]:8001")
    if not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidURLError(f"server address {url!r}: the port must be a number in 1..65535, not {port!r}")
    return text
