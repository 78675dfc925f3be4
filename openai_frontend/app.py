"""The FastAPI application: OpenAI chat completions over the chat ensembles.

Endpoints:

- ``POST /v1/chat/completions``: streamed (server-sent events, ``data: [DONE]``,
  ``stream_options.include_usage``) or whole;
- ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model;
- ``GET /health``: 200 only when Triton answers real inference (``mmtriton.serving.probe``);
- ``GET /metrics``: Prometheus text (:mod:`openai_frontend.metrics`).

Every request is checked here first (message roles, content parts, media counts and
sizes, parameters, the prompt's length in bytes) and refused with a 400 OpenAI-style
error naming the field; what only the server can tell (an image that does not decode,
a prompt over the engine's length in tokens) comes back from Triton as an input error
and is mapped to a 400 naming the part it came from. Only the front door's own
failures and Triton's are 5xx. Every error, unknown paths and methods included, has
the OpenAI body ``{"error": {message, type, param, code}}``.

Hostile bodies are bounded before they cost anything (:class:`_GuardBody`): a body over
:attr:`FrontendConfig.body_limit` is refused with a 413 (at once when its
``Content-Length`` says so, else as soon as the bytes received pass it) and a body not
received within ``body_timeout_s`` with a 408. Parsing a large body, bounding its prompt
and decoding its media run in worker threads, so the event loop keeps serving others.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from clients.llm import Chunk, Sampling, conversation_json, request_values
from mmtriton.contract import chat_ensemble
from openai_frontend.errors import APIError, bad_request
from openai_frontend.fetch import FetchBusy, FetchError, FetchPolicy, FetchPool
from openai_frontend.media import (
    OFFLOAD_BYTES,
    MediaLimits,
    ParsedMessages,
    longest_token_bytes,
    parse_messages,
    prompt_text_bytes,
)
from openai_frontend.metrics import Metrics
from openai_frontend.triton import TritonChat, TritonError

LOGGER = logging.getLogger(__name__)

#: Largest ``seed`` the ensembles take (UINT64).
_MAX_SEED = 2**64 - 1
#: Largest ``top_k`` the ensembles take (INT32).
_MAX_TOP_K = 2**31 - 1
#: ``temperature`` range (OpenAI's).
_TEMPERATURE_RANGE = (0.0, 2.0)
#: Room in the body limit for everything but the media and the prompt text (JSON syntax,
#: parameters, assistant turns, stop strings).
BODY_SLACK_BYTES = 1024 * 1024
#: Paths that label the requests metric as themselves; any other path is counted as ``unmatched``
#: (so that random paths cannot grow the metric without bound).
_KNOWN_PATHS = frozenset({"/v1/chat/completions", "/v1/models", "/health", "/metrics"})
#: Where a lone UTF-16 surrogate can come from in a JSON body: a ``\uD800``-``\uDFFF`` escape,
#: or the raw (CESU-8) bytes of one, which ``json.loads`` lets through.
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")
_SURROGATE = re.compile("[\ud800-\udfff]")
#: Request fields that the server's input errors name, by the ensemble input they come from.
_PARAM_OF_INPUT = {
    "text_input": "messages",
    "messages": "messages",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "stop_words": "stop",
}


@dataclass(frozen=True)
class FrontendConfig:
    """Everything the front door needs to know.

    Attributes:
        triton_url: ``host:port`` of Triton's gRPC endpoint.
        model_name: The ``id`` under ``/v1/models`` and the ``model`` of every response.
        limits: Media counts and sizes per request.
        max_output_len: The largest ``max_tokens``, and the default when a request gives none.
        fetch: The http(s) URL fetching policy.
        health_deadline_s: Deadline of each real inference ``/health`` sends.
        health_cache_s: How long a ``/health`` verdict is reused.
        metrics_on_api: Serve ``/metrics`` on the API port too (off when the metrics have a
            port of their own, so that a network policy can keep them to monitoring).
        max_input_len: The engine's longest prompt in tokens (``llm.max_input_len``); None: no
            prompt length check in the front door.
        token_bytes: The most text bytes one token stands for (:func:`longest_token_bytes`);
            None: no prompt length check in the front door.
        max_body_bytes: The largest request body; None: :func:`default_max_body_bytes`.
        body_timeout_s: Deadline for receiving a whole request body (408 after it).
    """

    triton_url: str
    model_name: str
    limits: MediaLimits = field(default_factory=MediaLimits)
    max_output_len: int = 256
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    health_deadline_s: float = 10.0
    health_cache_s: float = 5.0
    metrics_on_api: bool = True
    max_input_len: int | None = None
    token_bytes: int | None = None
    max_body_bytes: int | None = None
    body_timeout_s: float = 30.0

    @property
    def max_text_bytes(self) -> int | None:
        """The most system and user text bytes a prompt that fits can have (``max_input_len * L``), or None."""
        if self.max_input_len is None or self.token_bytes is None:
            return None
        return self.max_input_len * self.token_bytes

    @property
    def body_limit(self) -> int:
        """The request body limit in bytes: ``max_body_bytes``, or the one derived from the limits."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return default_max_body_bytes(self.limits, self.max_text_bytes)

    @classmethod
    def from_bundle(cls, bundle_dir: Path, triton_url: str, **overrides: Any) -> FrontendConfig:
        """Limits and the model name from a bundle's ``bundle.json`` (the model spec it was built from).

        Args:
            bundle_dir: The bundle folder (``build/bundles/<name>``).
            triton_url: Triton's gRPC ``host:port``.
            overrides: Any other field (``model_name``, ``fetch``, ...).
        """
        spec = json.loads((Path(bundle_dir) / "bundle.json").read_text())["spec"]
        values: dict[str, Any] = {
            "triton_url": triton_url,
            "model_name": spec["name"],
            "limits": MediaLimits(
                image_max_bytes=int(spec["vision"]["max_bytes"]), audio_max_bytes=int(spec["audio"]["max_bytes"])
            ),
            "max_output_len": int(spec["llm"]["max_output_len"]),
            "max_input_len": int(spec["llm"]["max_input_len"]),
            "token_bytes": longest_token_bytes(Path(bundle_dir) / "llm" / "tokenizer.json"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def default_max_body_bytes(limits: MediaLimits, max_text_bytes: int | None) -> int:
    """The largest request body a request within every limit can need.

    ``4/3`` of the image and the clip byte limits (base64), plus 5% for what JSON writers
    add inside base64 (``\\/`` for ``/``, line breaks); ``6x`` the prompt text bound (a
    ``\\u00XX`` escape is 6 bytes per byte of text; 64 bytes per token up to 8192 tokens when
    the bound is unknown); and :data:`BODY_SLACK_BYTES` for the rest.

    Args:
        limits: The media limits.
        max_text_bytes: :attr:`FrontendConfig.max_text_bytes`, or None.
    """
    media = 4 * math.ceil(limits.image_max_bytes / 3) * limits.max_images
    media += 4 * math.ceil(limits.audio_max_bytes / 3) * limits.max_audios
    text = max_text_bytes if max_text_bytes is not None else 8192 * 64
    return math.ceil(media * 1.05) + 6 * text + BODY_SLACK_BYTES


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """The fields of a chat completion request this server reads; any other field is ignored,
    except the ones whose effect this server cannot give (:data:`REFUSED_FIELDS`), which are
    refused unless they carry their neutral value.

    ``enable_thinking`` and ``return_reasoning`` are what OpenAI clients send through
    ``extra_body`` for reasoning models: ``enable_thinking`` (also read from
    ``chat_template_kwargs``) goes to the chat template; ``return_reasoning`` is accepted.
    ``top_k`` and ``ignore_eos`` (every answer runs to ``max_tokens``: benchmarks) are
    extensions in vLLM's dialect.
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool | None = None
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


def _zero(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0)


_NO_LOGPROBS = "log probabilities are not supported by this server"
_NO_TOOLS = "tool and function calling are not supported by this server"
_NO_GUIDED = "guided decoding is not supported by this server"
#: Fields that change the answer in OpenAI's API (or vLLM's extensions) and that this server
#: cannot honour: ``(name, accepted(value), why)``. A value the test accepts (absent, null,
#: or the neutral value) goes through; any other is a 400 naming the field.
REFUSED_FIELDS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("logprobs", lambda v: v is None or v is False, _NO_LOGPROBS),
    ("top_logprobs", lambda v: v is None, _NO_LOGPROBS),
    ("prompt_logprobs", lambda v: v is None, _NO_LOGPROBS),
    ("response_format", lambda v: v is None or v == {"type": "text"},
     'only {"type": "text"} is supported; JSON mode and structured outputs are not'),
    ("tools", lambda v: not v, _NO_TOOLS),
    ("tool_choice", lambda v: v is None or v == "none", _NO_TOOLS + '; only "none" is accepted'),
    ("functions", lambda v: not v, _NO_TOOLS),
    ("function_call", lambda v: v is None or v == "none", _NO_TOOLS + '; only "none" is accepted'),
    ("presence_penalty", _zero, "penalties are not supported by the engines; only 0 is accepted"),
    ("frequency_penalty", _zero, "penalties are not supported by the engines; only 0 is accepted"),
    ("repetition_penalty", lambda v: v is None or v == 1,
     "penalties are not supported by the engines; only 1 is accepted"),
    ("logit_bias", lambda v: not v, "logit_bias is not supported by the engines"),
    ("min_p", _zero, "min_p is not supported by the engines; only 0 is accepted"),
    ("min_tokens", _zero, "min_tokens is not supported by the engines; only 0 is accepted"),
    ("best_of", lambda v: v is None or v == 1, "only best_of=1 is supported"),
    ("use_beam_search", lambda v: not v, "beam search is not supported by the engines"),
    ("guided_json", lambda v: v is None, _NO_GUIDED),
    ("guided_regex", lambda v: v is None, _NO_GUIDED),
    ("guided_choice", lambda v: v is None, _NO_GUIDED),
    ("guided_grammar", lambda v: v is None, _NO_GUIDED),
    ("structured_outputs", lambda v: v is None, _NO_GUIDED),
    ("modalities", lambda v: v is None or v == ["text"], 'only text output is supported (modalities ["text"])'),
    ("audio", lambda v: v is None, "audio output is not supported by this server"),
)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """Refuse a request that asks for something this server would otherwise silently not do.

    Raises:
        APIError: 400 naming the first field of :data:`REFUSED_FIELDS` with a value other
            than its neutral one.
    """
    for name, accepted, why in REFUSED_FIELDS:
        if name in body and not accepted(body[name]):
            value = body[name]
            shown = f"{name}={json.dumps(value)}" if isinstance(value, bool | int | float | str) else name
            raise bad_request(f"{shown}: {why}", name, "unsupported_parameter")


def sampling_of(req: ChatCompletionRequest, max_output_len: int) -> Sampling:
    """The ensembles' sampling inputs for a request, checked.

    OpenAI's defaults differ from the engine's in one place: a ``temperature`` above 0
    with neither ``top_p`` nor ``top_k`` means plain sampling for OpenAI but greedy for
    TensorRT-LLM's contract (both at 0), so ``top_p`` 1.0 is sent with it. With no
    ``temperature`` at all the server's default (greedy) applies.

    Raises:
        APIError: ``n`` other than 1, ``max_tokens`` outside ``1..max_output_len``,
            ``temperature`` outside 0..2, ``top_p`` outside (0, 1], ``top_k`` other than -1
            or outside 0..2**31-1, a seed outside 0..2**64-1.
    """
    if req.n is not None and req.n != 1:
        raise bad_request(f"n={req.n}: this server returns one choice per request; only n=1 is supported", "n")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max_output_len
    if max_tokens < 1:
        raise bad_request(f"{name}={max_tokens}: must be at least 1", name)
    if max_tokens > max_output_len:
        raise bad_request(f"{name}={max_tokens}: over this model's limit of {max_output_len} tokens", name)
    if req.seed is not None and not 0 <= req.seed <= _MAX_SEED:
        raise bad_request(f"seed={req.seed}: must be within 0..{_MAX_SEED}", "seed")
    low, high = _TEMPERATURE_RANGE
    if req.temperature is not None and not low <= req.temperature <= high:
        raise bad_request(f"temperature={req.temperature}: must be within {low:g}..{high:g}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad_request(f"top_p={req.top_p}: must be within (0, 1]", "top_p")
    if req.top_k is not None and req.top_k != -1 and not 0 <= req.top_k <= _MAX_TOP_K:
        raise bad_request(f"top_k={req.top_k}: must be -1 (off) or within 0..{_MAX_TOP_K}", "top_k")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    top_k = None if req.top_k in (None, -1) else req.top_k  # -1: "no top-k" in vLLM's dialect
    top_p = req.top_p
    if req.temperature is not None and req.temperature > 0 and top_p is None and top_k is None:
        top_p = 1.0
    return Sampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=top_k,
        top_p=top_p,
        seed=req.seed,
        stop_words=tuple(s for s in stops if s),
        ignore_eos=bool(req.ignore_eos),
    )


def check_prompt_bytes(text_bytes: int, config: FrontendConfig) -> None:
    """Refuse a prompt whose system and user text alone cannot fit the engine.

    ``text_bytes`` bytes are at least ``ceil(text_bytes / L)`` tokens (``L`` =
    :attr:`FrontendConfig.token_bytes`), so a text over ``max_input_len * L`` bytes is over
    ``max_input_len`` tokens whatever the tokenizer makes of it: refusing it here can never
    refuse a prompt that fits, and saves Triton from tokenizing megabytes first.

    Raises:
        APIError: 400 naming ``messages`` and the limit.
    """
    limit = config.max_text_bytes
    if limit is None or text_bytes <= limit:
        return
    least = -(-text_bytes // (config.token_bytes or 1))
    raise bad_request(
        f"messages: the system and user text is {text_bytes} bytes, so at least {least} tokens "
        f"(this tokenizer's tokens stand for at most {config.token_bytes} bytes each), over this model's "
        f"limit of {config.max_input_len} input tokens",
        "messages",
        "prompt_too_long",
    )


def _thinking(req: ChatCompletionRequest) -> bool | None:
    if req.enable_thinking is not None:
        return req.enable_thinking
    value = (req.chat_template_kwargs or {}).get("enable_thinking")
    return value if isinstance(value, bool) else None


def _from_triton(err: TritonError, parsed: ParsedMessages) -> APIError:
    """A Triton failure as the client sees it: input errors are 400 naming the field, the rest 500."""
    if not err.invalid_input:
        return APIError(500, f"inference failed: {err.message}", code="inference_failed")
    param = {"image": parsed.image_param, "audio": parsed.audio_param}.get(err.input_name or "")
    param = param or _PARAM_OF_INPUT.get(err.input_name or "", err.input_name)
    return bad_request(f"{param}: {err.message}" if param else err.message, param, "rejected_by_model")


class StopText:
    """OpenAI ``stop`` semantics on streamed text: the answer ends before the first stop string.

    The engine stops on the stop strings' token sequences and keeps them (TensorRT-LLM's
    behaviour); OpenAI clients expect the text to end just before the first occurrence of
    any stop string, also one the tokenizer splits differently in context. Text that could
    still be the start of a stop string (the last ``len(longest stop) - 1`` characters) is
    held back until the next piece shows it is not.

    Args:
        stops: The request's stop strings (empty ones are ignored).
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Add a piece of the answer; return what can be sent now (sets :attr:`hit` at a stop string)."""
        if self.hit:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        if len(self.pending) <= self.hold:
            return ""
        cut = len(self.pending) - self.hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail once the answer has ended without a stop string."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class _Usage:
    """Token counts and timings of one answer, as the stream goes."""

    def __init__(self, started: float, metrics: Metrics) -> None:
        self.started = started
        self.metrics = metrics
        self.last: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, chunk: Chunk) -> None:
        now = time.perf_counter()
        if chunk.token_ids:
            if self.last is None:
                self.metrics.ttft.observe(now - self.started)
            else:
                self.metrics.itl.observe((now - self.last) / len(chunk.token_ids))
            self.last = now
        self.prompt_tokens = chunk.num_input_tokens or self.prompt_tokens
        self.completion_tokens = chunk.num_output_tokens or self.completion_tokens

    def body(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def finish_reason(self, max_tokens: int) -> str:
        return "length" if self.completion_tokens >= max_tokens else "stop"

    def record(self) -> None:
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.completion_tokens.inc(self.completion_tokens)


def decode_body(raw: bytes | bytearray) -> dict[str, Any]:
    """Parse a chat completion body, refusing what would fail later as a 500.

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


async def _in_thread_if(large: bool, func: Callable[..., Any], *args: Any) -> Any:
    """``func(*args)``: in a worker thread (anyio's, not the executor ``/health`` uses) when ``large``."""
    if large:
        return await anyio.to_thread.run_sync(func, *args)
    return func(*args)


async def _send_error(send: Any, err: APIError) -> None:
    """Send ``err`` as a whole response straight through ASGI (below the exception handlers)."""
    body = err.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (err.headers or {}).items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _GuardBody:
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
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            err = self._too_large(f"{int(declared)} bytes (Content-Length)")
            self.metrics.errors.labels(str(err.status), err.code or "").inc()
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


def _endpoint_label(scope: dict[str, Any]) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    return path if path in _KNOWN_PATHS or route is not None else "unmatched"


class _CountRequests:
    """Plain ASGI middleware counting responses by endpoint and status (it leaves streaming alone).

    A client that went away before its response was whole is counted as status 499
    (nginx's "client closed request"), whatever status had been started; a path no route
    matches is counted as ``unmatched``.
    """

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = {"code": None, "whole": False, "left": False}

        async def listen() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.disconnect" and not state["whole"]:
                state["left"] = True
            return message

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["whole"] = True
            await send(message)

        try:
            await self.app(scope, listen, watch)
        finally:
            code = 499 if state["left"] and not state["whole"] else state["code"] or 500
            self.metrics.requests.labels(_endpoint_label(scope), str(code)).inc()


async def _answer_pieces(
    first: Chunk | None, chunks: AsyncIterator[Chunk], usage: _Usage, stop: StopText
) -> AsyncIterator[str]:
    """The answer's text as it streams in: counted in ``usage``, cut at the first stop string
    (``stop``), empty pieces left out, the held-back tail last. At a stop string it stops
    reading; closing ``chunks`` then cancels the rest of the generation.
    """
    if first is not None:
        usage.add(first)
        if piece := stop.push(first.text):
            yield piece
        while not stop.hit:
            chunk = await anext(chunks, None)
            if chunk is None:
                break
            usage.add(chunk)
            if piece := stop.push(chunk.text):
                yield piece
    if piece := stop.flush():
        yield piece


async def _unless_client_leaves(work: Any, request: Request, poll_s: float = 0.1) -> bool:
    """Run ``work`` (a coroutine) to its end, unless the HTTP client disconnects first.

    Returns:
        True when ``work`` finished; False when the client went away (``work`` is cancelled).
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                task.result()  # its exception, if any
                return True
            if await request.is_disconnected():
                return False
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


#: What the 404 answer lists.
ENDPOINTS = "POST /v1/chat/completions, GET /v1/models, GET /v1/models/{model}, GET /health, GET /metrics"


def create_app(config: FrontendConfig) -> FastAPI:
    """Build the front door for one Triton server and model.

    Args:
        config: Where Triton is, the model's name and limits, the URL policy.
    """
    metrics = Metrics()
    state: dict[str, Any] = {"health": (0.0, False, "not checked yet")}
    health_lock = asyncio.Lock()  # one probe at a time; callers that waited reuse its verdict

    fetches = FetchPool(config.fetch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["triton"] = TritonChat(config.triton_url)
        try:
            yield
        finally:
            await state["triton"].close()
            fetches.close()

    app = FastAPI(title="mmtriton OpenAI-compatible front door", lifespan=lifespan)
    created = int(time.time())

    async def fetch(url: str, max_bytes: int, param: str) -> tuple[bytes, str]:
        try:
            got = await fetches.fetch(url, max_bytes)
        except FetchBusy as err:
            raise APIError(503, f"{param}: image URL not fetched: {err}", param, "fetch_busy") from None
        except FetchError as err:
            raise bad_request(f"{param}: image URL refused: {err}", param, "url_refused") from None
        return got.data, got.content_type

    # The last one added is the outermost: the counting sees the body guard's refusals too.
    app.add_middleware(_GuardBody, max_bytes=config.body_limit, timeout_s=config.body_timeout_s, metrics=metrics)
    app.add_middleware(_CountRequests, metrics=metrics)

    def error_response(err: APIError) -> Response:
        metrics.errors.labels(str(err.status), err.code or "").inc()
        return Response(err.body_bytes(), status_code=err.status, media_type="application/json", headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        if err.status >= 500:
            LOGGER.warning("%s %s: %s", request.method, request.url.path, err.message)
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> Response:
        """Routing's own answers (unknown path, wrong method) in the OpenAI error shape."""
        where = f"{request.method} {request.url.path}"
        if err.status_code == 404:
            message, code = f"{where}: no such endpoint on this server (it serves {ENDPOINTS})", "not_found"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            message, code = f"{where}: method not allowed; this path takes {allowed}", "method_not_allowed"
        else:
            message, code = f"{where}: {err.detail}", "http_error"
        api = APIError(err.status_code, message, None, code, dict(err.headers or {}) or None)
        return error_response(api)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        first = (err.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or None
        return error_response(bad_request(f"{where}: {first.get('msg', 'invalid request')}", where))

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, err: ClientDisconnect) -> Response:
        """The client went away while its body was being read: nobody to answer (counted as 499)."""
        LOGGER.info("client of %s %s went away before sending its whole body", request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> Response:
        LOGGER.exception("unexpected failure on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal error in the front door", code="internal_error"))

    def model_card() -> dict[str, Any]:
        return {"id": config.model_name, "object": "model", "created": created, "owned_by": "mmtriton"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != config.model_name:
            raise APIError(
                404, f"the model {model_id!r} does not exist; this server serves {config.model_name!r}",
                "model", "model_not_found",
            )
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        from mmtriton.serving.probe import ProbeFailed, probe

        async with health_lock:
            checked, ok, reason = state["health"]
            if time.monotonic() - checked > config.health_cache_s:
                try:
                    await asyncio.to_thread(probe, config.triton_url, config.health_deadline_s)
                    ok, reason = True, "Triton answered real inference"
                except ProbeFailed as err:
                    ok, reason = False, str(err)
                except Exception as err:  # noqa: BLE001 (any failure to reach or use Triton means "not ready")
                    ok, reason = False, f"{err.__class__.__name__}: {err}"
                state["health"] = (time.monotonic(), ok, reason)
        if ok:
            return JSONResponse({"status": "ok", "detail": reason})
        metrics.errors.labels("503", "not_ready").inc()
        unready = APIError(503, f"not ready: {reason}", None, "not_ready").body()
        return JSONResponse({"status": "unavailable", "detail": reason, **unready}, status_code=503)

    if config.metrics_on_api:

        @app.get("/metrics")
        async def metrics_text() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        raw = bytearray()
        async for piece in request.stream():  # not request.body(): that would keep a copy on the request
            raw += piece
        large = len(raw) > OFFLOAD_BYTES
        body = await _in_thread_if(large, decode_body, raw)
        del raw
        refuse_unsupported(body)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise bad_request(f"{where}: {first['msg']}", where) from None
        del body
        sampling = sampling_of(req, config.max_output_len)
        if config.max_text_bytes is not None:
            text_bytes = await _in_thread_if(large, prompt_text_bytes, req.messages)
            check_prompt_bytes(text_bytes, config)
        parsed = await parse_messages(req.messages, config.limits, fetch)
        req.messages = []  # the media are in ``parsed`` now; let the base64 text go
        values = request_values(
            None, parsed.image, parsed.audio, sampling, stream=True, messages=conversation_json(parsed.messages, _thinking(req))
        )
        rid = uuid.uuid4().hex
        header = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": config.model_name}
        usage = _Usage(started, metrics)
        chunks = state["triton"].stream(chat_ensemble(parsed.image is not None, parsed.audio is not None), values, rid)
        metrics.in_flight.inc()
        try:
            # The first response decides the status: an input error before any token is a 400.
            first = await anext(chunks, None)
        except TritonError as err:
            metrics.in_flight.dec()
            raise _from_triton(err, parsed) from None
        except BaseException:
            metrics.in_flight.dec()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(first, chunks, header, usage, sampling, include_usage, parsed),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text: list[str] = []
        stop = StopText(sampling.stop_words)

        async def collect() -> None:
            text.extend([piece async for piece in _answer_pieces(first, chunks, usage, stop)])

        try:
            if not await _unless_client_leaves(collect(), request):
                # Nobody reads the answer any more: closing the stream (below) frees the engine's slot.
                metrics.cancelled.inc()
                LOGGER.info("client of %s went away before the whole answer; its Triton stream is cancelled", header["id"])
                return Response(status_code=499)
        except TritonError as err:
            raise _from_triton(err, parsed) from None
        finally:
            metrics.in_flight.dec()
            with anyio.CancelScope(shield=True):
                await chunks.aclose()
        usage.record()
        return JSONResponse(
            {
                **header,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "logprobs": None,
                        "finish_reason": "stop" if stop.hit else usage.finish_reason(sampling.max_tokens),
                    }
                ],
                "usage": usage.body(),
                "system_fingerprint": None,
            }
        )

    async def _stream(
        first: Chunk | None,
        chunks: AsyncIterator[Chunk],
        header: dict[str, Any],
        usage: _Usage,
        sampling: Sampling,
        include_usage: bool,
        parsed: ParsedMessages,
    ) -> AsyncIterator[bytes]:
        base = {**header, "object": "chat.completion.chunk", "system_fingerprint": None}
        extra = {"usage": None} if include_usage else {}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return _sse({**base, "choices": [choice], **extra})

        ended = False
        stop = StopText(sampling.stop_words)
        try:
            yield event({"role": "assistant", "content": ""})
            async for piece in _answer_pieces(first, chunks, usage, stop):
                yield event({"content": piece})
            ended = True
            usage.record()
            yield event({}, "stop" if stop.hit else usage.finish_reason(sampling.max_tokens))
            if include_usage:
                yield _sse({**base, "choices": [], "usage": usage.body()})
            yield _sse("[DONE]")
        except (TritonError, APIError) as err:
            ended = True
            api = _from_triton(err, parsed) if isinstance(err, TritonError) else err
            metrics.errors.labels(str(api.status), api.code or "").inc()
            yield _sse(api.body())
            yield _sse("[DONE]")
        finally:
            if not ended:
                metrics.cancelled.inc()
                LOGGER.info("client of %s went away mid-stream; its Triton stream is cancelled", header["id"])
            with anyio.CancelScope(shield=True):
                await chunks.aclose()  # cancels the Triton stream when it has not finished
            metrics.in_flight.dec()

    return app
