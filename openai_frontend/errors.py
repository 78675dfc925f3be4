"""The front door's error type and its OpenAI-style JSON body."""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    """An error returned to the client as ``{"error": {message, type, param, code}}``.

    Args:
        status: HTTP status (4xx for the client's input, 5xx for the server's own failures).
        message: What the client can act on: names the message index, the part and the limit.
        param: The request field at fault, e.g. ``messages[1].content[0]``.
        code: A short machine-readable reason, e.g. ``image_too_large``.
        headers: Extra response headers (``Connection: close`` after a body that was not read).
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    @property
    def kind(self) -> str:
        """The OpenAI error ``type``: every 4xx is ``invalid_request_error``, as OpenAI answers them."""
        if 400 <= self.status < 500:
            return "invalid_request_error"
        if self.status == 503:
            return "service_unavailable"
        return "server_error"

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def body_bytes(self) -> bytes:
        """:meth:`body` as UTF-8 JSON (a lone surrogate quoted from the input is escaped, never a failure)."""
        return json.dumps(self.body(), ensure_ascii=False).encode("utf-8", "backslashreplace")


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    """An HTTP 400 error for the client's input."""
    return APIError(400, message, param, code)
