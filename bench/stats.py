"""Statistics over recorded request timings (no I/O, no server: pure functions).

A benchmark run records, for every request, when it was sent, when each output
token arrived and when the last response came back. This module turns those
records into the figures the report shows.

Definitions (all times in seconds on one monotonic clock):

* **latency**: ``end - send`` of a successful request (the whole answer).
* **TTFT** (time to first token): ``first_token - send``.
* **ITL** (inter-token latency): for each successful request with token arrival
  times ``t_1 <= t_2 <= ... <= t_n``, the gaps ``t_{i+1} - t_i``
  (``i = 1 .. n-1``), *pooled* over all requests before taking the mean and the
  percentiles (a request with many tokens weighs more than one with few). When
  one streamed response carries several tokens, each of its tokens gets that
  response's arrival time, so the gaps between them are 0; a request with fewer
  than two tokens contributes no gap.
* **duration**: from the earliest ``send`` to the latest ``end`` over all
  measured requests, failed ones included (a failure still took wall time).
* **requests/s**: successful requests / duration; **output tokens/s**: output
  tokens of successful requests / duration.
* **errors**: requests whose ``error`` is set. Their timings are left out of
  every latency figure.

Percentiles are :func:`numpy.percentile` with its default linear interpolation
between the two nearest ranks, e.g. P50 of ``[1, 2, 3, 4]`` is 2.5 and P90 is
3.7. A figure over an empty set is ``nan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "RequestTiming",
    "RunStats",
    "percentile",
    "latencies",
    "ttfts",
    "inter_token_latencies",
    "duration",
    "requests_per_s",
    "output_tokens_per_s",
    "error_count",
    "summarize",
    "percent_change",
]


@dataclass
class RequestTiming:
    """What the load generator recorded for one request.

    Attributes:
        send_s: When the request was sent.
        end_s: When its last response (or its error) arrived.
        token_times_s: Arrival time of every output token, in order (tokens that
            came in one response share its time).
        output_tokens: Output tokens received (normally ``len(token_times_s)``).
        error: Why the request failed, or None if it succeeded.
    """

    send_s: float
    end_s: float
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None

    @property
    def first_token_s(self) -> float | None:
        """Arrival time of the first token, or None if none came."""
        return self.token_times_s[0] if self.token_times_s else None


@dataclass
class RunStats:
    """Summary figures of one run (seconds; ``nan`` where there is no data).

    Attributes:
        requests: Requests measured (successful and failed).
        errors: Failed requests.
        duration_s: First send to last end.
        output_tokens: Output tokens of the successful requests.
        requests_per_s: Successful requests per second.
        output_tokens_per_s: Output tokens per second.
        latency_avg_s, latency_p50_s, latency_p90_s, latency_p99_s: Request latency.
        ttft_avg_s, ttft_p50_s, ttft_p99_s: Time to first token.
        itl_avg_s, itl_p99_s: Inter-token latency (pooled gaps, see the module docstring).
    """

    requests: int
    errors: int
    duration_s: float
    output_tokens: int
    requests_per_s: float
    output_tokens_per_s: float
    latency_avg_s: float
    latency_p50_s: float
    latency_p90_s: float
    latency_p99_s: float
    ttft_avg_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    itl_avg_s: float
    itl_p99_s: float

    def to_dict(self) -> dict[str, Any]:
        """The figures as a plain dict (``nan`` becomes None, for JSON)."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation; ``nan`` if empty."""
    data = np.asarray(values, dtype=np.float64)
    return float(np.percentile(data, q)) if data.size else math.nan


def _mean(values: Sequence[float] | np.ndarray) -> float:
    data = np.asarray(values, dtype=np.float64)
    return float(data.mean()) if data.size else math.nan


def latencies(timings: Sequence[RequestTiming]) -> np.ndarray:
    """``end - send`` of every successful request."""
    return np.array([t.end_s - t.send_s for t in timings if t.ok], dtype=np.float64)


def ttfts(timings: Sequence[RequestTiming]) -> np.ndarray:
    """``first token - send`` of every successful request that produced a token."""
    return np.array([t.token_times_s[0] - t.send_s for t in timings if t.ok and t.token_times_s], dtype=np.float64)


def inter_token_latencies(timings: Sequence[RequestTiming]) -> np.ndarray:
    """Gaps between consecutive token arrivals within each successful request, pooled.

    Raises:
        ValueError: A request's token times are not in order.
    """
    gaps: list[np.ndarray] = []
    for timing in timings:
        if not timing.ok or len(timing.token_times_s) < 2:
            continue
        diffs = np.diff(np.asarray(timing.token_times_s, dtype=np.float64))
        if (diffs < 0).any():
            raise ValueError(f"token times of a request are not in order: {timing.token_times_s}")
        gaps.append(diffs)
    return np.concatenate(gaps) if gaps else np.zeros(0, dtype=np.float64)


def duration(timings: Sequence[RequestTiming]) -> float:
    """Earliest send to latest end over all requests (0 for none)."""
    if not timings:
        return 0.0
    return max(t.end_s for t in timings) - min(t.send_s for t in timings)


def requests_per_s(timings: Sequence[RequestTiming]) -> float:
    """Successful requests per second of :func:`duration`; ``nan`` if the duration is 0."""
    span = duration(timings)
    return sum(1 for t in timings if t.ok) / span if span > 0 else math.nan


def output_tokens_per_s(timings: Sequence[RequestTiming]) -> float:
    """Output tokens of successful requests per second of :func:`duration`; ``nan`` if it is 0."""
    span = duration(timings)
    return sum(t.output_tokens for t in timings if t.ok) / span if span > 0 else math.nan


def error_count(timings: Sequence[RequestTiming]) -> int:
    """Number of failed requests."""
    return sum(1 for t in timings if not t.ok)


def summarize(timings: Sequence[RequestTiming]) -> RunStats:
    """All summary figures of one run."""
    lat = latencies(timings)
    first = ttfts(timings)
    itl = inter_token_latencies(timings)
    return RunStats(
        requests=len(timings),
        errors=error_count(timings),
        duration_s=duration(timings),
        output_tokens=sum(t.output_tokens for t in timings if t.ok),
        requests_per_s=requests_per_s(timings),
        output_tokens_per_s=output_tokens_per_s(timings),
        latency_avg_s=_mean(lat),
        latency_p50_s=percentile(lat, 50),
        latency_p90_s=percentile(lat, 90),
        latency_p99_s=percentile(lat, 99),
        ttft_avg_s=_mean(first),
        ttft_p50_s=percentile(first, 50),
        ttft_p99_s=percentile(first, 99),
        itl_avg_s=_mean(itl),
        itl_p99_s=percentile(itl, 99),
    )


def percent_change(before: float | None, after: float | None) -> float:
    """``(after - before) / before * 100``; ``nan`` when either is missing or ``before`` is 0."""
    if before is None or after is None or before == 0 or math.isnan(before) or math.isnan(after):
        return math.nan
    return (after - before) / before * 100.0


def fmt(value: float | None, spec: str = ".3f") -> str:
    """Format a figure for a table or a progress line.

    Args:
        value: The figure (None or NaN: not available).
        spec: Format spec, as for :func:`format`.

    Returns:
        ``format(value, spec)``, or ``n/a``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def flat_figures(stats: dict[str, Any]) -> dict[str, Any]:
    """The report figures of a :meth:`RunStats.to_dict` (or a dict with its keys), in report units.

    Returns:
        ``tok_s``, ``req_s``, ``latency_avg_s``, ``p99_s`` (latency), ``ttft_ms``,
        ``ttft_p99_ms``, ``itl_ms``, ``itl_p99_ms`` (means and P99s) and ``errors``.
    """
    return {
        "tok_s": stats["output_tokens_per_s"],
        "req_s": stats["requests_per_s"],
        "latency_avg_s": stats["latency_avg_s"],
        "p99_s": stats["latency_p99_s"],
        "ttft_ms": stats["ttft_avg_s"] * 1e3,
        "ttft_p99_ms": stats["ttft_p99_s"] * 1e3,
        "itl_ms": stats["itl_avg_s"] * 1e3,
        "itl_p99_ms": stats["itl_p99_s"] * 1e3,
        "errors": stats["errors"],
    }
