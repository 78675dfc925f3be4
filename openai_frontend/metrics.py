"""The front door's Prometheus metrics (``GET /metrics``), in a registry of its own, and the
ASGI middleware that counts every response (:class:`CountRequests`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from openai_frontend.errors import APIError

#: Latency buckets (seconds) for time to first token.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Latency buckets (seconds) for inter-token latency.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Counters, gauges and histograms of one front door.

    Attributes:
        requests: Finished requests by endpoint and HTTP status (errors included).
        errors: Error responses by HTTP status and error code (also errors inside a stream).
        in_flight: Chat completions being answered now.
        ttft: Seconds from receiving a chat completion to its first token.
        itl: Seconds between tokens: the gap between streamed chunks divided by the tokens they carry.
        prompt_tokens: Prompt tokens (media rows included) of finished answers.
        completion_tokens: Generated tokens of finished answers.
        cancelled: Streams whose client went away before the end (their Triton stream was cancelled).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        prefix = "mmtriton_openai_"
        self.requests = Counter(prefix + "requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.errors = Counter(prefix + "errors", "error responses by status and code", ["status", "code"], registry=self.registry)
        self.in_flight = Gauge(prefix + "requests_in_flight", "chat completions being answered", registry=self.registry)
        self.ttft = Histogram(prefix + "time_to_first_token_seconds", "time to first token", buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram(prefix + "inter_token_latency_seconds", "time between tokens", buckets=ITL_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter(prefix + "prompt_tokens", "prompt tokens, media rows included", registry=self.registry)
        self.completion_tokens = Counter(prefix + "completion_tokens", "generated tokens", registry=self.registry)
        self.cancelled = Counter(prefix + "streams_cancelled", "streams closed by the client before the end", registry=self.registry)

    def count_error(self, err: APIError) -> None:
        """Count one error answered (as a response, or as an event inside a stream) by its status and code.

        Args:
            err: The error.
        """
        self.errors.labels(str(err.status), err.code or "").inc()


class CountRequests:
    """Plain ASGI middleware counting responses by endpoint and status (it leaves streaming alone).

    A client that went away before its response was whole is counted as status 499
    (nginx's "client closed request"), whatever status had been started. The endpoint is
    the route's path; a request no route took is counted under its path when that is one
    of ``known_paths`` (a refusal before routing, such as the body guard's), else as
    ``unmatched`` (so that random paths cannot grow the metric without bound).

    Args:
        app: The ASGI application.
        metrics: Where the responses are counted.
        known_paths: Paths that label the requests metric as themselves.
    """

    def __init__(self, app: Any, metrics: Metrics, known_paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.known_paths = known_paths

    def _endpoint(self, scope: dict[str, Any]) -> str:
        route = scope.get("route")
        path = getattr(route, "path", None) or scope.get("path", "")
        return path if path in self.known_paths or route is not None else "unmatched"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pass one ASGI connection on and count its response (HTTP only; anything else untouched)."""
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
            self.metrics.requests.labels(self._endpoint(scope), str(code)).inc()
