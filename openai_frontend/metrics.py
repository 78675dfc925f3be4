"""The front door's Prometheus metrics (``GET /metrics``), in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
