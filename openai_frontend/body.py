"""Request bodies: bounded in size and time before they cost anything, then decoded as JSON.

:class:`GuardBody` is plain ASGI middleware: a body over the limit is refused with a 413
(at once when its ``Content-Length`` says so, else as soon as the bytes received pass it)
and a body not received within its deadline with a 408; both close the connection.
:func:`read_body` collects a body that got through, and :func:`decode_body` parses it,
refusing what would otherwise fail later as a 500 (``NaN``, lone UTF-16 surrogates).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import anyio
from starlette.requests import Request

from openai_frontend.errors import APIError, bad_request
from openai_frontend.metrics import Metrics

#: Where a lone UTF-16 surrogate can come from in a JSON body: a ``\uD800``-``\uDFFF`` escape,
#: or the raw (CESU-8) bytes of one, which ``json.loads`` lets through.
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_body(request: Request) -> bytearray:
    """The whole body of ``request``, without a copy kept on the request (as ``request.body()`` would).

    Args:
        request: The request (its body bounded by :class:`GuardBody`).

    Returns:
        The body's bytes.
    """
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
    return raw


def decode_body(raw: bytes | bytearray) -> dict[str, Any]:
    """Parse a chat completion body, refusing what would fail later as a 500.

    Args:
        raw: The body's bytes.

    Returns:
        The decoded JSON object.

    Raises:
        APIError: 400 for a body that is not JSON (``NaN`` and ``Infinity`` included, and
            integers of more than 4300 digits), nested too deeply for the parser, not an
            object, or holding a lone UTF-16 surrogate (``"\\ud800"``) in any string:
            such text cannot be encoded for Triton. The message names where.
    """
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise bad_request("the request body is not valid JSON: nested too deeply", None, "invalid_json") from None
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise bad_request(f"the request body is not valid JSON: {err}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", None, "invalid_json")
    if _SURROGATE_SOURCE.search(raw):
        _refuse_lone_surrogates(body)
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """Raise a 400 naming the first string (or key) of ``body`` with a lone surrogate."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            found = _SURROGATE.search(value)
            if found:
                where = path or "the request body"
                raise bad_request(
                    f"{where}: invalid Unicode: a lone surrogate U+{ord(found.group()):04X} "
                    "(escaped surrogates must come in high-low pairs)",
                    path or None,
                    "invalid_unicode",
                )
        elif isinstance(value, dict):  # pushed in reverse, so the first one in the body is found first
            for key, item in reversed(value.items()):
                stack.append((item, f"{path}.{key}" if path else key))
                stack.append((key, path))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))


async def _send_error(send: Any, err: APIError) -> None:
    """Send ``err`` as a whole response straight through ASGI (below the exception handlers)."""
    body = err.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class GuardBody:
    """Plain ASGI middleware bounding the request body in size and in time.

    A ``Content-Length`` over ``max_bytes`` is refused with a 413 before a byte of the body
    is read; otherwise ``receive`` is wrapped: a 413 as soon as the bytes received pass
    ``max_bytes`` (chunked bodies, or a body longer than declared), a 408 when the body is
    not whole ``timeout_s`` after the request's headers arrived. Both answers close the
    connection (the rest of the body is never read). Once the body is whole, ``receive``
    is passed through untouched (waiting for a disconnect has no deadline).

    Args:
        app: The ASGI application.
        max_bytes: The body limit.
        timeout_s: The body deadline.
        metrics: Where the refusals are counted.
    """

    def __init__(self, app: Any, max_bytes: int, timeout_s: float, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.metrics = metrics

    def _too_large(self, size: str) -> APIError:
        return APIError(
            413, f"the request body is {size}, over this server's limit of {self.max_bytes} bytes",
            None, "body_too_large", {"Connection": "close"},
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass one ASGI connection on, its body bounded (HTTP only; anything else untouched)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            err = self._too_large(f"{int(declared)} bytes (Content-Length)")
            self.metrics.count_error(err)
            await _send_error(send, err)
            return
        deadline = time.monotonic() + self.timeout_s
        state = {"received": 0, "whole": False}

        async def guarded() -> dict[str, Any]:
            if state["whole"]:
                return await receive()
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                    message = await receive()
            except TimeoutError:
                raise APIError(
                    408, f"the request body was not received within {self.timeout_s:g} s",
                    None, "body_timeout", {"Connection": "close"},
                ) from None
            if message["type"] != "http.request":
                state["whole"] = True  # a disconnect
                return message
            state["received"] += len(message.get("body", b""))
            if state["received"] > self.max_bytes:
                raise self._too_large(f"over {state['received']} bytes")
            state["whole"] = not message.get("more_body", False)
            return message

        await self.app(scope, guarded, send)
