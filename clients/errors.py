"""Typed errors raised by the client library."""

from __future__ import annotations

from mmtriton.contract import input_error_in


class ClientError(RuntimeError):
    """Base class of every error the client library raises."""


class InvalidInputError(ClientError):
    """The server rejected an input (Triton status INVALID_ARGUMENT); the message names it."""


class ServerUnavailableError(ClientError):
    """The server could not be reached or is not ready.

    Attributes:
        url: The address the client tried (``host:port``), when known.
        connected: Something answered at ``url`` (the wrong port, a server not ready);
            False when no connection could be made at all.
    """

    def __init__(self, message: str, url: str | None = None, connected: bool = False) -> None:
        super().__init__(message)
        self.url = url
        self.connected = connected


class InvalidURLError(ClientError):
    """The server address is not ``host:port``; nothing was sent (see :mod:`clients.address`)."""


class InferenceFailedError(ClientError):
    """The server accepted the request but failed to process it."""


# What gRPC and the socket layer say when no connection could be made at all.
_NO_CONNECTION = (
    "failed to connect",
    "connection refused",
    "errors resolving",
    "dns resolution failed",
    "name or service not known",
    "no address associated",
    "connect failed",
    "deadline exceeded",
    "connection reset",
    "timed out",
)


def server_unavailable(url: str | None, reason: str, protocol: str = "gRPC") -> ServerUnavailableError:
    """The error for a server that could not be reached, or answered that it is unavailable.

    The message names the address, so a user sees where the client looked::

        could not reach the server at localhost:8001 (gRPC): failed to connect to all addresses; ...

    Args:
        url: The address tried (``host:port``); None when unknown.
        reason: What the transport reported.
        protocol: ``gRPC`` or ``HTTP``, for the message.

    Returns:
        The typed error to raise.
    """
    where = f"the server at {url} ({protocol})" if url else f"the server ({protocol})"
    lowered = reason.lower()
    if protocol == "gRPC" and "socket closed" in lowered:
        # A connection was made and dropped at once: what an HTTP/1.1 endpoint does to gRPC.
        return ServerUnavailableError(
            f"could not reach {where}: {reason} (is that the HTTP port? Triton's gRPC port is 8001 by default)",
            url,
            connected=True,
        )
    if any(marker in lowered for marker in _NO_CONNECTION):
        return ServerUnavailableError(f"could not reach {where}: {reason}", url)
    return ServerUnavailableError(f"{where} is unavailable: {reason}", url, connected=True)


def from_triton_exception(err: Exception, url: str | None = None, protocol: str = "gRPC") -> ClientError:
    """Map a ``tritonclient`` exception to a typed client error.

    Errors inside a gRPC stream carry only a message, no status code, so an
    input error is also recognised by the server's ``input '<name>': `` prefix.

    Args:
        err: The exception (an ``InferenceServerException``, or any other).
        url: The server address, named in a :class:`ServerUnavailableError`'s message.
        protocol: ``gRPC`` or ``HTTP``, for that message.

    Returns:
        The typed client error to raise.
    """
    status = str(getattr(err, "status", lambda: "")() or "")
    message = getattr(err, "message", lambda: str(err))() or str(err)
    if "INVALID_ARGUMENT" in status or status == "400" or (not status and input_error_in(message)):
        return InvalidInputError(message)
    if "UNAVAILABLE" in status or "unavailable" in message.lower() or "connect" in message.lower():
        return server_unavailable(url, message, protocol)
    return InferenceFailedError(message)
