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
covers the whole fetch, redirects included, and it is a hard one: a server that drips
its headers or body a byte at a time keeps every single ``recv`` within a socket
timeout, so at the deadline a timer shuts the socket down, which ends any ``recv``
blocked on it (:class:`_Deadline`). The body is read with ``read1`` (one ``recv`` at
a time), the deadline checked between reads.

Fetches run on a thread pool of their own with a bounded number at once
(:class:`FetchPool`), never on the event loop's default executor that ``/health``
uses; a fetch that cannot start before its deadline is refused.
"""

from __future__ import annotations

import asyncio
import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
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


class FetchBusy(FetchError):
    """No fetch slot became free before the fetch's deadline (the server is busy, not the URL's fault)."""


class _DeadlinePassed(FetchError):
    """The fetch's deadline passed (:meth:`_Deadline.remaining`)."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the fetcher may do.

    Attributes:
        enabled: Fetch http(s) URLs at all.
        allowed_hosts: Host names or IP literals (lower case) that may be fetched.
        max_redirects: Redirects followed per URL.
        timeout_s: Deadline of one whole fetch, redirects included (waiting for a slot too).
        max_concurrent: Fetches running at once (:class:`FetchPool`).
    """

    enabled: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)
    max_redirects: int = 3
    timeout_s: float = 10.0
    max_concurrent: int = 8


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


class _Deadline:
    """The hard deadline of one fetch: when it passes, the socket in use is shut down.

    ``shutdown`` (unlike ``close``) wakes a ``recv`` blocked in another thread, which then
    reads end-of-file; the fetch sees :attr:`expired` and reports the deadline. The socket
    watched is a duplicate of the connection's descriptor (:meth:`watch`), so it stays
    valid whatever the connection does with its own (TLS wraps and detaches it).
    """

    def __init__(self, timeout_s: float, end: float | None = None) -> None:
        self.timeout_s = timeout_s
        self.end = time.monotonic() + timeout_s if end is None else end
        self.expired = False
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._timer = threading.Timer(max(self.end - time.monotonic(), 0.0), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def remaining(self) -> float:
        """Seconds left; raises :class:`_DeadlinePassed` when none are."""
        left = self.end - time.monotonic()
        if left <= 0 or self.expired:
            raise _DeadlinePassed(f"fetching took longer than {self.timeout_s:g} s")
        return left

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock``'s connection down at the deadline (at once if it has passed)."""
        dup = sock.dup()
        with self._lock:
            self._release()
            self._sock = dup
            if self.expired:
                self._shut()

    def _shut(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer

    def _release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            self._shut()

    def cancel(self) -> None:
        """Stop the timer and let go of the watched socket."""
        self._timer.cancel()
        with self._lock:
            self._release()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a checked address, whatever the ``Host`` header says."""

    def __init__(self, host: str, address: str, port: int, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.remaining())
        self._address = address
        self._deadline = deadline

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self._deadline.remaining())
        self._deadline.watch(self.sock)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is checked against the URL's host."""

    def __init__(self, host: str, address: str, port: int, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.remaining(), context=ssl.create_default_context())
        self._address = address
        self._deadline = deadline

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self._deadline.remaining())
        self._deadline.watch(sock)  # the TLS handshake is under the deadline too
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def fetch_url(url: str, max_bytes: int, policy: FetchPolicy, end: float | None = None) -> Fetched:
    """Fetch ``url`` under ``policy``, reading at most ``max_bytes`` of body (blocking; run it in a thread).

    Args:
        url: An http(s) URL.
        max_bytes: The media item's byte limit; the read stops once the body passes it.
        policy: The operator's policy.
        end: The deadline as a ``time.monotonic()`` value (default: ``policy.timeout_s`` from now).

    Returns:
        The body and its content type.

    Raises:
        FetchError: Refused (see :func:`check_url`), too many redirects, an HTTP error
            status, a body over ``max_bytes``, a network error or the deadline passed
            (the message says while doing what).
    """
    deadline = _Deadline(policy.timeout_s, end)
    try:
        for _ in range(policy.max_redirects + 1):
            parts, address, port = check_url(url, policy)
            fetched, url = _one_hop(url, parts, address, port, max_bytes, deadline)
            if fetched is not None:
                return fetched
        raise FetchError(f"more than {policy.max_redirects} redirects")
    finally:
        deadline.cancel()


def _one_hop(
    url: str, parts: urllib.parse.SplitResult, address: str, port: int, max_bytes: int, deadline: _Deadline
) -> tuple[Fetched | None, str]:
    """One request: the body (and the URL), or None and the URL a redirect points to."""
    kind = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
    conn = kind(parts.hostname or "", address, port, deadline)
    doing = "connecting and sending the request"
    try:
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        conn.request("GET", path, headers={"Accept": "image/*, audio/*", "User-Agent": "mmtriton-openai-frontend"})
        doing = "reading the response headers"
        resp = conn.getresponse()
        if resp.status in _REDIRECTS:
            location = resp.getheader("Location")
            if not location:
                raise FetchError(f"HTTP {resp.status} without a Location header")
            LOGGER.debug("redirected to %s", location)
            return None, urllib.parse.urljoin(url, location)
        if resp.status != 200:
            raise FetchError(f"HTTP {resp.status} {resp.reason}")
        declared = resp.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise FetchError(f"body of {int(declared)} bytes is over the limit of {max_bytes} bytes")
        doing = "reading the body"
        body = bytearray()
        while True:
            if conn.sock is not None:
                conn.sock.settimeout(deadline.remaining())
            chunk = resp.read1(min(_CHUNK, max_bytes + 1 - len(body)))
            if deadline.expired:  # what the shut-down socket returned is not the body's end
                break
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise FetchError(f"body is over the limit of {max_bytes} bytes (stopped reading)")
        deadline.remaining()
        content_type = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()
        return Fetched(bytes(body), content_type), url
    except _DeadlinePassed:
        raise FetchError(f"fetching took longer than {deadline.timeout_s:g} s (while {doing})") from None
    except (OSError, http.client.HTTPException) as err:
        if deadline.expired or time.monotonic() >= deadline.end:  # the socket was shut down at the deadline
            raise FetchError(f"fetching took longer than {deadline.timeout_s:g} s (while {doing})") from None
        raise FetchError(f"could not fetch: {err.__class__.__name__}: {err}") from None
    finally:
        conn.close()


class FetchPool:
    """Runs fetches on threads of their own, at most ``policy.max_concurrent`` at once.

    The pool has exactly as many threads as slots, so a fetch that has a slot starts at
    once; one that gets no slot before its deadline is refused (:class:`FetchBusy`).
    Nothing here touches the event loop's default executor (``asyncio.to_thread``).

    Args:
        policy: The operator's policy (its ``timeout_s`` covers the wait for a slot too).
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._executor = ThreadPoolExecutor(max(1, policy.max_concurrent), thread_name_prefix="url-fetch")
        self._slots = asyncio.Semaphore(max(1, policy.max_concurrent))

    async def fetch(self, url: str, max_bytes: int) -> Fetched:
        """Fetch ``url`` (see :func:`fetch_url`) without blocking the event loop.

        Raises:
            FetchBusy: Every slot stayed taken until the deadline.
            FetchError: As :func:`fetch_url`.
        """
        end = time.monotonic() + self.policy.timeout_s
        try:
            await asyncio.wait_for(self._slots.acquire(), self.policy.timeout_s)
        except TimeoutError:
            raise FetchBusy(
                f"{self.policy.max_concurrent} URL fetches were already running and none ended within "
                f"the {self.policy.timeout_s:g} s fetch deadline; try again later or send the data inline"
            ) from None
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, fetch_url, url, max_bytes, self.policy, end)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Let the threads go (running fetches end at their deadline)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
