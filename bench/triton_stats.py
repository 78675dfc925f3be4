"""Server-side figures: model configs and the statistics API over gRPC, Prometheus ``/metrics`` parsing."""

from __future__ import annotations

import contextlib
import logging
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

LOGGER = logging.getLogger(__name__)
# Chat-ensemble inputs that force max_tokens output tokens, used when the server has one:
# TensorRT-LLM's `min_tokens` (set to max_tokens) or an `ignore_eos` flag.
FIXED_LENGTH_INPUTS = ("min_tokens", "ignore_eos")


@dataclass
class ServerTarget:
    """A running server to measure.

    Attributes:
        grpc_url: ``host:port`` of the gRPC endpoint.
        metrics_url: URL of Triton's Prometheus ``/metrics`` (None: no metrics).
        pid: Server process id, for CPU utilization of its process tree (None: unknown).
    """

    grpc_url: str
    metrics_url: str | None = None
    pid: int | None = None


@dataclass
class ServerInfo:
    """What the benchmark reads from the server's own model configs.

    ``fixed_length_input`` names the chat-ensemble input that forces fixed-length
    outputs (one of :data:`FIXED_LENGTH_INPUTS`), or None when the ensembles have none.
    """

    server_version: str
    tokenizer_dir: str | None
    max_input_len: int | None
    max_output_len: int | None
    engine_max_batch_size: int | None
    gpt_model_path: str | None
    llm_queue_delay_us: int | None
    fixed_length_input: str | None


def grpc_client(url: str) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


def server_info(url: str) -> ServerInfo:
    """Read the server version and the preprocessing / tensorrt_llm configs over gRPC."""
    client = grpc_client(url)
    try:
        version = client.get_server_metadata().version
        pre = client.get_model_config("preprocessing").config
        llm = client.get_model_config("tensorrt_llm").config
        chat_inputs = {tensor.name for tensor in client.get_model_metadata("chat_text").inputs}
    finally:
        client.close()

    def param(config: Any, key: str) -> str | None:
        return config.parameters[key].string_value if key in config.parameters else None

    def as_int(value: str | None) -> int | None:
        return int(value) if value not in (None, "") else None

    delay = llm.dynamic_batching.max_queue_delay_microseconds if llm.HasField("dynamic_batching") else None
    return ServerInfo(
        server_version=version,
        tokenizer_dir=param(pre, "tokenizer_dir"),
        max_input_len=as_int(param(pre, "max_input_len")),
        max_output_len=as_int(param(pre, "max_output_len")),
        engine_max_batch_size=int(llm.max_batch_size),
        gpt_model_path=param(llm, "gpt_model_path"),
        llm_queue_delay_us=delay,
        fixed_length_input=next((name for name in FIXED_LENGTH_INPUTS if name in chat_inputs), None),
    )


def _stat(duration: Any) -> dict[str, int]:
    return {"count": int(duration.count), "ns": int(duration.ns)}


def model_stats(url: str) -> dict[str, dict[str, Any]]:
    """Cumulative per-model statistics from Triton's statistics API (all versions summed).

    Returns:
        ``{model: {"inference_count", "execution_count", "success", "fail", "queue",
        "compute_input", "compute_infer", "compute_output": {"count", "ns"},
        "batch": {batch_size: executions}}}``.
    """
    client = grpc_client(url)
    try:
        response = client.get_inference_statistics()
    finally:
        client.close()
    out: dict[str, dict[str, Any]] = {}
    for stats in response.model_stats:
        entry = out.setdefault(
            stats.name,
            {"inference_count": 0, "execution_count": 0, "batch": {}}
            | {
                k: {"count": 0, "ns": 0}
                for k in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
            },
        )
        entry["inference_count"] += int(stats.inference_count)
        entry["execution_count"] += int(stats.execution_count)
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            value = _stat(getattr(stats.inference_stats, key))
            entry[key]["count"] += value["count"]
            entry[key]["ns"] += value["ns"]
        for batch in stats.batch_stats:
            size = int(batch.batch_size)
            entry["batch"][size] = entry["batch"].get(size, 0) + int(batch.compute_infer.count)
    return out


def model_stats_delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-model figures of what happened between two :func:`model_stats` snapshots.

    For each model that ran: requests that succeeded / failed, executions (Triton
    batches), mean Triton batch size, average queue and compute times in ms per
    request, and executions per batch size. For decoupled models (``tensorrt_llm``
    and the chat ensembles) the compute time covers ``execute()`` only, not the
    responses sent after it returns.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, now in after.items():
        delta = _model_delta(before.get(name, {}), now)
        if delta is not None:
            out[name] = delta
    return out


def _model_delta(then: dict[str, Any], now: dict[str, Any]) -> dict[str, Any] | None:
    def diff(key: str, part: str) -> int:
        return now[key][part] - then.get(key, {}).get(part, 0)

    def avg_ms(key: str) -> float | None:
        count = diff(key, "count")
        return diff(key, "ns") / count / 1e6 if count else None

    executions = now["execution_count"] - then.get("execution_count", 0)
    inferences = now["inference_count"] - then.get("inference_count", 0)
    success, fail = diff("success", "count"), diff("fail", "count")
    if not (executions or success or fail):
        return None  # the model did nothing in between
    old_batches = then.get("batch", {})
    return {
        "success": success,
        "fail": fail,
        "executions": executions,
        "inferences": inferences,
        "mean_batch": inferences / executions if executions else None,
        "request_ms": avg_ms("success"),
        "queue_ms": avg_ms("queue"),
        "compute_input_ms": avg_ms("compute_input"),
        "compute_infer_ms": avg_ms("compute_infer"),
        "compute_output_ms": avg_ms("compute_output"),
        "batch_sizes": {
            size: count - old_batches.get(size, 0)
            for size, count in sorted(now["batch"].items())
            if count - old_batches.get(size, 0) > 0
        },
    }


_METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Parse Prometheus text exposition into ``{"name{labels}": value}`` (comments skipped)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _METRIC_LINE.match(line)
        if match:
            with contextlib.suppress(ValueError):
                values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return values


def metric_sum(metrics: dict[str, float], name: str) -> float | None:
    """Sum of every series of one metric name (None if absent)."""
    found = [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]
    return sum(found) if found else None


def metric_values(metrics: dict[str, float], name: str) -> list[float]:
    """Every series' value of one metric name."""
    return [v for k, v in metrics.items() if k == name or k.startswith(name + "{")]


def scrape_metrics(url: str | None, timeout_s: float = 5.0) -> dict[str, float]:
    """Fetch and parse ``/metrics``; empty if there is no URL or it cannot be read."""
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return parse_metrics(resp.read().decode("utf-8", "replace"))
    except (urllib.error.URLError, OSError) as err:
        LOGGER.warning("cannot read metrics from %s: %s", url, err)
        return {}


def engine_delta(before: dict[str, float], after: dict[str, float], duration_s: float) -> dict[str, Any]:
    """Engine batching figures between two metrics snapshots.

    Returns:
        ``steps`` (forward steps that produced tokens), ``sequences`` (sum over steps of
        the sequences in each), ``mean_batch``, ``steps_per_s``, and ``max_batch_since_start``
        (a gauge: the largest step batch since the server started, not only in this run).
    """
    steps_a = metric_sum(after, "mmtriton_engine_steps_total")
    seqs_a = metric_sum(after, "mmtriton_engine_step_sequences_total")
    if steps_a is None or seqs_a is None:
        return {"available": False}
    steps = steps_a - (metric_sum(before, "mmtriton_engine_steps_total") or 0.0)
    seqs = seqs_a - (metric_sum(before, "mmtriton_engine_step_sequences_total") or 0.0)
    return {
        "available": True,
        "steps": int(steps),
        "sequences": int(seqs),
        "mean_batch": seqs / steps if steps else None,
        "steps_per_s": steps / duration_s if duration_s > 0 else None,
        "max_batch_since_start": metric_sum(after, "mmtriton_engine_step_batch_size_max"),
    }
