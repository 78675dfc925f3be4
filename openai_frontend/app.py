"""The FastAPI application: OpenAI chat completions over the chat ensembles.

Endpoints:

- ``POST /v1/chat/completions``: streamed (server-sent events, ``data: [DONE]``,
  ``stream_options.include_usage``) or whole;
- ``GET /v1/models``: the one served model;
- ``GET /health``: 200 only when Triton answers real inference (``mmtriton.probe``);
- ``GET /metrics``: Prometheus text (:mod:`openai_frontend.metrics`).

Every request is checked here first (message roles, content parts, media counts and
sizes, parameters) and refused with a 400 OpenAI-style error naming the field; what
only the server can tell (an image that does not decode, a prompt over the engine's
length) comes back from Triton as an input error and is mapped to a 400 naming the
part it came from. Only the front door's own failures and Triton's are 5xx.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, ValidationError

from clients.llm import Chunk, Sampling, conversation_json, request_values
from mmtriton.contract import chat_ensemble
from openai_frontend.errors import APIError, bad_request
from openai_frontend.fetch import FetchError, FetchPolicy, fetch_url
from openai_frontend.media import MediaLimits, ParsedMessages, parse_messages
from openai_frontend.metrics import Metrics
from openai_frontend.triton import TritonChat, TritonError

LOGGER = logging.getLogger(__name__)

#: Largest ``seed`` the ensembles take (UINT64).
_MAX_SEED = 2**64 - 1
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
    """

    triton_url: str
    model_name: str
    limits: MediaLimits = field(default_factory=MediaLimits)
    max_output_len: int = 256
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    health_deadline_s: float = 10.0
    health_cache_s: float = 5.0
    metrics_on_api: bool = True

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
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """The fields of a chat completion request this server reads; any other field is ignored.

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


def sampling_of(req: ChatCompletionRequest, max_output_len: int) -> Sampling:
    """The ensembles' sampling inputs for a request, checked.

    OpenAI's defaults differ from the engine's in one place: a ``temperature`` above 0
    with neither ``top_p`` nor ``top_k`` means plain sampling for OpenAI but greedy for
    TensorRT-LLM's contract (both at 0), so ``top_p`` 1.0 is sent with it. With no
    ``temperature`` at all the server's default (greedy) applies.

    Raises:
        APIError: ``n`` other than 1, ``max_tokens`` outside ``1..max_output_len``, a
            seed outside 0..2**64-1, a stop sequence that is not text.
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


class _CountRequests:
    """Plain ASGI middleware counting responses by path and status (it leaves streaming and disconnects alone)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.metrics.requests.labels(scope["path"], str(status["code"])).inc()


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


def create_app(config: FrontendConfig) -> FastAPI:
    """Build the front door for one Triton server and model.

    Args:
        config: Where Triton is, the model's name and limits, the URL policy.
    """
    metrics = Metrics()
    state: dict[str, Any] = {"health": (0.0, False, "not checked yet")}
    health_lock = asyncio.Lock()  # one probe at a time; callers that waited reuse its verdict

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state["triton"] = TritonChat(config.triton_url)
        try:
            yield
        finally:
            await state["triton"].close()

    app = FastAPI(title="mmtriton OpenAI-compatible front door", lifespan=lifespan)
    created = int(time.time())

    async def fetch(url: str, max_bytes: int, param: str) -> tuple[bytes, str]:
        try:
            got = await asyncio.to_thread(fetch_url, url, max_bytes, config.fetch)
        except FetchError as err:
            raise bad_request(f"{param}: image URL refused: {err}", param, "url_refused") from None
        return got.data, got.content_type

    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        metrics.errors.labels(str(err.status), err.code or "").inc()
        if err.status >= 500:
            LOGGER.warning("%s %s: %s", request.method, request.url.path, err.message)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        LOGGER.exception("unexpected failure on %s %s", request.method, request.url.path)
        metrics.errors.labels("500", "internal_error").inc()
        return JSONResponse(APIError(500, "internal error in the front door", code="internal_error").body(), status_code=500)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": created, "owned_by": "mmtriton"}],
        }

    @app.get("/health")
    async def health() -> JSONResponse:
        from mmtriton.probe import ProbeFailed, probe

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
        return JSONResponse({"status": "ok" if ok else "unavailable", "detail": reason}, status_code=200 if ok else 503)

    if config.metrics_on_api:

        @app.get("/metrics")
        async def metrics_text() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise bad_request(f"{where}: {first['msg']}", where) from None
        sampling = sampling_of(req, config.max_output_len)
        parsed = await parse_messages(req.messages, config.limits, fetch)
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
