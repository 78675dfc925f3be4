"""Fetching ``image_url`` http(s) URLs without becoming a proxy into the private network.

Off unless the operator enables it. When enabled, every hop (the first URL and each
redirect) is checked before any connection is made:

1. the scheme is ``http`` or ``https`` (``file://``, ``ftp://``, ``data:`` ... are refused);
2. the host is on the operator's allowlist;
3. the host is resolved, and every address it resolves to must be a public one:
   private, loopback, link-local (which holds the cloud metadata address
   169.254.169.254), shared, multicast, reserved and unspecified addresses are
   refused. An IP literal written in the allowlist (``127.0.0.1``) is the one way
   to allow such an address, for that address only; a hostname never unlocks one.
   Cloud metadata addresses are refused even then;
4. the connection goes to the address that was checked (not to a second lookup
   of the name, which a rebinding DNS server could answer differently).

The body is read in chunks and the read stops as soon as it passes the byte limit
(a ``Content-Length`` over the limit stops it before the first chunk). One deadline
covers the whole fetch, redirects included.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass, field

LOGGER = logging.getLogger(__name__)

#: Instance metadata endpoints of the big clouds: refused even when allowlisted.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_CHUNK = 64 * 1024
_REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """A URL that was refused or could not be fetched (the message says why)."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the fetcher may do.

    Attributes:
        enabled: Fetch http(s) URLs at all.
        allowed_hosts: Host names or IP literals (lower case) that may be fetched.
        max_redirects: Redirects followed per URL.
        timeout_s: Deadline of one whole fetch, redirects included.
    """

    enabled: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    max_redirects: int = 3
    timeout_s: float = 10.0


@dataclass(frozen=True)
class Fetched:
    """A fetched body and its declared type (``Content-Type`` without parameters, lower case)."""

    data: bytes
    content_type: str


def _address_refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be fetched from by default, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    for check, name in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_unspecified", "an unspecified address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_private", "a private address"),
    ):
        if getattr(address, check):
            return name
    if not address.is_global:
        return "not a public address"
    return None


def check_url(url: str, policy: FetchPolicy) -> tuple[urllib.parse.SplitResult, str, int]:
    """Check one hop's URL and pick the address to connect to.

    Args:
        url: The URL of this hop.
        policy: The operator's policy.

    Returns:
        The parsed URL, the checked IP address to connect to, and the port.

    Raises:
        FetchError: Fetching disabled, a scheme other than http(s), a host not on the
            allowlist, a name that does not resolve, or an address that is refused.
    """
    if not policy.enabled:
        raise FetchError("fetching URLs is disabled on this server (start it with --allow-url-fetch); send the data inline as a data: URL")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"URL scheme {parts.scheme or '(none)'!r} is not allowed; only http and https are")
    host = (parts.hostname or "").lower()
    if not host:
        raise FetchError("URL has no host")
    if host not in policy.allowed_hosts:
        raise FetchError(f"host {host!r} is not on this server's URL allowlist")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise FetchError("URL has an invalid port") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise FetchError(f"host {host!r} does not resolve ({err})") from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        reason = _address_refusal(address)
        # Only the URL's own IP literal, written in the allowlist, unlocks a refused address.
        explicitly_allowed = host == str(address) and address not in METADATA_ADDRESSES
        if reason and not explicitly_allowed:
            raise FetchError(f"host {host!r} resolves to {address}, {reason}; refused")
        addresses.append(str(address))
    if not addresses:
        raise FetchError(f"host {host!r} has no address")
    return parts, addresses[0], port


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a checked address, whatever the ``Host`` header says."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is checked against the URL's host."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, max_bytes: int, policy: FetchPolicy) -> Fetched:
    """Fetch ``url`` under ``policy``, reading at most ``max_bytes`` of body (blocking; run it in a thread).

    Args:
        url: An http(s) URL.
        max_bytes: The media item's byte limit; the read stops once the body passes it.
        policy: The operator's policy.

    Returns:
        The body and its content type.

    Raises:
        FetchError: Refused (see :func:`check_url`), too many redirects, an HTTP error
            status, a body over ``max_bytes``, a network error or the deadline passed.
    """
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(policy.max_redirects + 1):
        parts, address, port = check_url(url, policy)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError(f"fetching took longer than {policy.timeout_s:g} s")
        kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        conn = kind(parts.hostname or "", address, port, timeout=remaining)
        try:
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            conn.request("GET", path, headers={"Accept": "image/*, audio/*", "User-Agent": "mmtriton-openai-frontend"})
            resp = conn.getresponse()
            if resp.status in _REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError(f"HTTP {resp.status} without a Location header")
                url = urllib.parse.urljoin(url, location)
                LOGGER.debug("redirected to %s", url)
                continue
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status} {resp.reason}")
            declared = resp.getheader("Content-Length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise FetchError(f"body of {int(declared)} bytes is over the limit of {max_bytes} bytes")
            body = bytearray()
            while True:
                if time.monotonic() > deadline:
                    raise FetchError(f"fetching took longer than {policy.timeout_s:g} s")
                chunk = resp.read(min(_CHUNK, max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"body is over the limit of {max_bytes} bytes (stopped reading)")
            content_type = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
            return Fetched(bytes(body), content_type)
        except (OSError, http.client.HTTPException) as err:
            raise FetchError(f"could not fetch: {err.__class__.__name__}: {err}") from None
        finally:
            conn.close()
    raise FetchError(f"more than {policy.max_redirects} redirects")
