"""The FastAPI application: OpenAI chat completions over the chat ensembles.

Endpoints (:data:`ENDPOINTS`):

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

Where the pieces live: :mod:`openai_frontend.config` (limits, from the bundle's spec),
:mod:`openai_frontend.body` (body size and time bounds, JSON decoding),
:mod:`openai_frontend.request` (the request model, refused fields, sampling checks),
:mod:`openai_frontend.media` (content parts), :mod:`openai_frontend.answer` (the answer,
whole or streamed) and :mod:`openai_frontend.triton` (gRPC streaming). Parsing a large
body, bounding its prompt and decoding its media run in worker threads, so the event
loop keeps serving others.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from clients.llm import conversation_json, request_values
from mmtriton.contract import chat_ensemble
from openai_frontend.answer import Answer, streamed_answer, whole_answer
from openai_frontend.body import GuardBody, decode_body, read_body
from openai_frontend.config import FrontendConfig
from openai_frontend.errors import APIError, bad_request
from openai_frontend.fetch import FetchBusy, FetchError, FetchPool
from openai_frontend.media import off_loop_if_large, parse_messages, prompt_text_bytes
from openai_frontend.metrics import CountRequests, Metrics
from openai_frontend.request import check_prompt_bytes, read_request, sampling_of, validation_failure
from openai_frontend.triton import TritonChat

LOGGER = logging.getLogger(__name__)

#: The endpoints, as the 404 answer lists them: ``(method, path)``.
ENDPOINTS = (
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("GET", "/health"),
    ("GET", "/metrics"),
)
#: Paths that label the requests metric as themselves even when no route took the request.
_KNOWN_PATHS = frozenset(path for _, path in ENDPOINTS if "{" not in path)


def create_app(config: FrontendConfig) -> FastAPI:
    """Build the front door for one Triton server and model.

    Args:
        config: Where Triton is, the model's name and limits, the URL policy.

    Returns:
        The ASGI application; ``app.state.metrics`` holds its :class:`Metrics`.
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
    app.add_middleware(GuardBody, max_bytes=config.body_limit, timeout_s=config.body_timeout_s, metrics=metrics)
    app.add_middleware(CountRequests, metrics=metrics, known_paths=_KNOWN_PATHS)

    def error_response(err: APIError) -> Response:
        metrics.count_error(err)
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
            served = ", ".join(f"{method} {path}" for method, path in ENDPOINTS)
            message, code = f"{where}: no such endpoint on this server (it serves {served})", "not_found"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            message, code = f"{where}: method not allowed; this path takes {allowed}", "method_not_allowed"
        else:
            message, code = f"{where}: {err.detail}", "http_error"
        api = APIError(err.status_code, message, None, code, dict(err.headers or {}) or None)
        return error_response(api)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> Response:
        return error_response(validation_failure(list(err.errors())))

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
                    ok, reason = False, f"Triton at {config.triton_url}: {err}"
                except Exception as err:  # noqa: BLE001 (any failure to reach or use Triton means "not ready")
                    ok, reason = False, f"Triton at {config.triton_url}: {err.__class__.__name__}: {err}"
                state["health"] = (time.monotonic(), ok, reason)
        if ok:
            return JSONResponse({"status": "ok", "detail": reason})
        unready = APIError(503, f"not ready: {reason}", None, "not_ready")
        metrics.count_error(unready)
        return JSONResponse({"status": "unavailable", "detail": reason, **unready.body()}, status_code=503)

    if config.metrics_on_api:

        @app.get("/metrics")
        async def metrics_text() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.metrics = metrics

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        started = time.perf_counter()
        raw = await read_body(request)
        size = len(raw)
        body = await off_loop_if_large(size, decode_body, raw)
        del raw
        req = read_request(body)
        del body
        sampling = sampling_of(req, config.max_output_len)
        if config.max_text_bytes is not None:
            check_prompt_bytes(await off_loop_if_large(size, prompt_text_bytes, req.messages), config)
        parsed = await parse_messages(req.messages, config.limits, fetch)
        req.messages = []  # the media are in ``parsed`` now; let the base64 text go
        values = request_values(
            None, parsed.image, parsed.audio, sampling, stream=True, messages=conversation_json(parsed.messages, req.thinking)
        )
        rid = uuid.uuid4().hex
        header = {"id": f"chatcmpl-{rid}", "created": int(time.time()), "model": config.model_name}
        chunks = state["triton"].stream(chat_ensemble(parsed.image is not None, parsed.audio is not None), values, rid)
        answer = await Answer.begin(chunks, header, started, sampling, parsed, metrics)
        if req.stream:
            return streamed_answer(answer, req.include_usage)
        return await whole_answer(answer, request)

    return app
