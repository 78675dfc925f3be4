"""Worker replicas for a target request rate and P99, from measured per-replica figures.

``python -m tools.k8s_capacity --qps 100 --p99-s 2.5`` reads the served levels of a
measurement report (default: the H200 gpu-vllm one, ``docs/measurements/h200-2026-12-02-vllm-served``)
and answers:

* the largest concurrency per replica whose P99 stays within the target (P99 and
  throughput interpolated linearly between measured concurrencies; never extrapolated
  past the highest one measured);
* the requests/s one replica serves there;
* the replicas needed for the target rate at the given utilization (the share of that
  capacity the autoscaler aims at, leaving room for bursts and for a replica that is
  starting or draining);
* the HPA target: mean chat requests in flight per pod (the metric
  ``triton_chat_requests_in_flight``), the same utilization of that concurrency.

The measurements are closed-loop (a fixed number of clients); by Little's law the mean
number in flight equals throughput x mean latency, which is what the HPA metric measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_REPORT = ROOT / "docs" / "measurements" / "h200-2026-12-02-vllm-served" / "vllm-report.json"


class CapacityError(ValueError):
    """The target cannot be met with the measured figures (or the figures are unusable)."""


@dataclass(frozen=True)
class Level:
    """One measured concurrency of one replica.

    Attributes:
        concurrency: Requests kept in flight by the closed-loop clients.
        req_s: Completed requests per second.
        p99_s: 99th percentile of request latency, seconds.
        tok_s: Output tokens per second.
    """

    concurrency: float
    req_s: float
    p99_s: float
    tok_s: float


@dataclass(frozen=True)
class Plan:
    """The answer for one target.

    Attributes:
        concurrency: Highest concurrency per replica whose P99 meets the target.
        replica_req_s: Requests/s of one replica at that concurrency.
        replicas: Replicas needed for the target rate at the utilization.
        hpa_in_flight_target: Mean requests in flight per pod for the HPA (``averageValue``).
    """

    concurrency: float
    replica_req_s: float
    replicas: int
    hpa_in_flight_target: int


def load_levels(report: Path = DEFAULT_REPORT) -> list[Level]:
    """The served levels of a ``bench.vllm_report`` JSON report, by concurrency.

    Raises:
        CapacityError: No served level, or latency that does not grow with concurrency.
    """
    data = json.loads(Path(report).read_text())
    levels = sorted(
        (
            Level(float(item["concurrency"]), float(s["req_s"]), float(s["p99_s"]), float(s["tok_s"]))
            for item in data["levels"]
            if (s := item.get("served"))
        ),
        key=lambda level: level.concurrency,
    )
    if not levels:
        raise CapacityError(f"{report}: no served levels")
    for low, high in zip(levels, levels[1:]):
        if high.p99_s < low.p99_s or high.req_s < low.req_s:
            raise CapacityError(f"{report}: P99 and req/s must not fall as concurrency grows ({low} -> {high})")
    return levels


def _between(low: Level, high: Level, concurrency: float) -> Level:
    share = (concurrency - low.concurrency) / (high.concurrency - low.concurrency)
    return Level(
        concurrency,
        low.req_s + share * (high.req_s - low.req_s),
        low.p99_s + share * (high.p99_s - low.p99_s),
        low.tok_s + share * (high.tok_s - low.tok_s),
    )


def max_level_within(levels: list[Level], p99_s: float) -> Level:
    """The highest (interpolated) level whose P99 is at most ``p99_s``.

    Raises:
        CapacityError: Even the lowest measured concurrency misses the target.
    """
    if levels[0].p99_s > p99_s:
        raise CapacityError(
            f"P99 {p99_s:g} s is below the lowest measured ({levels[0].p99_s:.2f} s at c={levels[0].concurrency:g})"
        )
    best = levels[0]
    for low, high in zip(levels, levels[1:]):
        if high.p99_s <= p99_s:
            best = high
            continue
        if high.p99_s > low.p99_s:
            share = (p99_s - low.p99_s) / (high.p99_s - low.p99_s)
            best = _between(low, high, low.concurrency + share * (high.concurrency - low.concurrency))
        break
    return best


def plan(qps: float, p99_s: float, levels: list[Level], utilization: float = 0.8) -> Plan:
    """Replicas and HPA target for ``qps`` requests/s with P99 within ``p99_s``.

    Args:
        qps: Target request rate over the whole deployment.
        p99_s: Target 99th percentile latency (same request shape as the measurement).
        levels: Measured levels of one replica (:func:`load_levels`).
        utilization: Share of a replica's capacity to plan for, in (0, 1].

    Raises:
        CapacityError: Bad arguments, or a P99 target below every measured level.
    """
    if qps <= 0 or not 0 < utilization <= 1:
        raise CapacityError(f"need qps > 0 and 0 < utilization <= 1 (got {qps}, {utilization})")
    level = max_level_within(levels, p99_s)
    replicas = math.ceil(qps / (level.req_s * utilization) - 1e-9)
    target = max(1, math.floor(level.concurrency * utilization + 1e-9))
    return Plan(level.concurrency, level.req_s, replicas, target)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the plan as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--qps", type=float, required=True, help="target requests/s over all workers")
    parser.add_argument("--p99-s", type=float, required=True, help="target P99 latency of one request, seconds")
    parser.add_argument("--utilization", type=float, default=0.8, help="share of a replica's capacity (default 0.8)")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="measurement report (vllm-report.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        result = plan(args.qps, args.p99_s, load_levels(args.report), args.utilization)
    except CapacityError as err:
        LOGGER.error("%s", err)
        return 2
    sys.stdout.write(
        json.dumps(
            {
                "qps": args.qps,
                "p99_s": args.p99_s,
                "utilization": args.utilization,
                "concurrency_per_replica": round(result.concurrency, 2),
                "replica_req_s": round(result.replica_req_s, 3),
                "replicas": result.replicas,
                "hpa_in_flight_target": result.hpa_in_flight_target,
            }
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
