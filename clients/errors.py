"""Typed errors raised by the client library."""

from __future__ import annotations

from mmtriton.contract import input_error_in


class ClientError(RuntimeError):
    """Base class of every error the client library raises."""


class InvalidInputError(ClientError):
    """The server rejected an input (Triton status INVALID_ARGUMENT); the message names it."""


class ServerUnavailableError(ClientError):
    """The server could not be reached or is not ready."""


class InferenceFailedError(ClientError):
    """The server accepted the request but failed to process it."""




def from_triton_exception(err: Exception) -> ClientError:
    """Map a ``tritonclient`` exception to a typed client error.

    Errors inside a gRPC stream carry only a message, no status code, so an
    input error is also recognised by the server's ``input '<name>': `` prefix.
    """
    status = str(getattr(err, "status", lambda: "")() or "")
    message = getattr(err, "message", lambda: str(err))() or str(err)
    if "INVALID_ARGUMENT" in status or status == "400" or (not status and input_error_in(message)):
        return InvalidInputError(message)
    if "UNAVAILABLE" in status or "unavailable" in message.lower() or "connect" in message.lower():
        return ServerUnavailableError(message)
    return InferenceFailedError(message)
