"""One configuration: warm-up, then every concurrency level with client- and server-side figures."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.load import Progress, RequestRecord, run_requests
from bench.stats import RunStats, fmt, summarize
from bench.triton_stats import (
    FIXED_LENGTH_INPUTS,
    ServerTarget,
    engine_delta,
    metric_values,
    model_stats,
    model_stats_delta,
    scrape_metrics,
    server_info,
)
from bench.utilization import UtilizationSampler, host_copy_bandwidth_gbs, weight_bytes
from bench.workload import BenchSettings, Workload, load_tokenizer, max_prompt_tokens

LOGGER = logging.getLogger(__name__)
# The tensorrt_llm model pushes its engine counters to /metrics every 0.2 s.
METRICS_SETTLE_S = 0.5


@dataclass
class LevelResult:
    """One concurrency level of one configuration."""

    concurrency: int
    stats: RunStats
    records: list[RequestRecord]
    start_s: float
    end_s: float
    models: dict[str, dict[str, Any]]
    engine: dict[str, Any]
    utilization: dict[str, Any]
    samples: list[dict[str, float | None]]
    short_outputs: int
    token_count_mismatches: int
    mbu_pct: float | None


@dataclass
class ConfigResult:
    """All levels run against one server configuration."""

    label: str
    repo: str | None
    repository_manifest: dict[str, Any] | None
    server: dict[str, Any]
    warmup: list[RequestRecord]
    levels: list[LevelResult]
    server_log: str | None = None


def run_level(
    target: ServerTarget,
    workload: Workload,
    concurrency: int,
    settings: BenchSettings,
    t0: float,
    weights: int | None,
    copy_bandwidth_gbs: float | None,
    progress: Progress | None = None,
    label: str = "",
    fixed_length_input: str | None = None,
) -> LevelResult:
    """Run one concurrency level and gather the client- and server-side figures."""
    stats_before = model_stats(target.grpc_url)
    metrics_before = scrape_metrics(target.metrics_url)
    sampler = UtilizationSampler(target, t0)
    sampler.start()
    start = time.perf_counter()
    deadline = start + settings.duration_s if settings.duration_s is not None else None
    count = settings.requests
    indices: Iterator[int] = iter(range(count)) if count is not None else _count_from(0)
    records = run_requests(
        target, workload, indices, concurrency, settings, t0, deadline, progress, label, fixed_length_input
    )
    end = time.perf_counter()
    utilization = sampler.stop()
    time.sleep(METRICS_SETTLE_S)
    stats = summarize([r.timing() for r in records])
    engine = engine_delta(metrics_before, scrape_metrics(target.metrics_url), stats.duration_s)
    models = model_stats_delta(stats_before, model_stats(target.grpc_url))
    ok = [r for r in records if not r.error]
    mbu = None
    if weights and copy_bandwidth_gbs and engine.get("steps_per_s"):
        mbu = 100.0 * weights * engine["steps_per_s"] / (copy_bandwidth_gbs * 1e9)
    return LevelResult(
        concurrency=concurrency,
        stats=stats,
        records=sorted(records, key=lambda r: r.index),
        start_s=start - t0,
        end_s=end - t0,
        models=models,
        engine=engine,
        utilization=utilization,
        samples=sampler.samples,
        short_outputs=sum(1 for r in ok if r.output_tokens < r.max_tokens),
        token_count_mismatches=sum(1 for r in ok if r.server_output_tokens not in (None, r.output_tokens)),
        mbu_pct=mbu,
    )


def _count_from(start: int) -> Iterator[int]:
    index = start
    while True:
        yield index
        index += 1


def run_config(
    target: ServerTarget,
    settings: BenchSettings,
    *,
    label: str,
    repo: Path | None = None,
    tokenizer: str | Path | None = None,
    copy_bandwidth_gbs: float | None = None,
    progress: Progress | None = None,
) -> ConfigResult:
    """Warm up, then run every concurrency level of ``settings`` against one server.

    Args:
        target: The running server.
        settings: The workload.
        label: Name of this configuration in the report (e.g. ``before``).
        repo: Its model repository, if known (recorded in the report).
        tokenizer: Tokenizer folder; default: the server's preprocessing ``tokenizer_dir``.
        copy_bandwidth_gbs: Device copy bandwidth (read + write) for model-bandwidth
            utilization; None: measured on the host when the server is on the CPU.
        progress: Receives progress lines.

    Raises:
        ValueError: The settings do not fit the server (output length, no tokenizer).
    """
    settings.validate()
    info = server_info(target.grpc_url)
    if info.max_output_len is not None and settings.output_tokens > info.max_output_len:
        raise ValueError(
            f"--output-tokens {settings.output_tokens} exceeds the server's max_output_len {info.max_output_len}"
        )
    tokenizer_dir = tokenizer or info.tokenizer_dir
    if not tokenizer_dir or not Path(tokenizer_dir).exists():
        raise ValueError(f"tokenizer folder {tokenizer_dir!r} not found here: pass --tokenizer")
    max_prompt = max_prompt_tokens(info.max_input_len, settings.input_tokens)
    if settings.input_tokens > max_prompt:
        LOGGER.warning("prompts are capped at %d tokens (server max_input_len %s)", max_prompt, info.max_input_len)
    if info.fixed_length_input is None:
        LOGGER.warning(
            "the chat ensembles have no %s input: a request ends early when the model emits its end token "
            "(the report counts them as 'ended short')",
            " or ".join(FIXED_LENGTH_INPUTS),
        )
    workload = Workload(load_tokenizer(tokenizer_dir), settings, max_prompt)
    t0 = time.perf_counter()
    gpu = bool(metric_values(scrape_metrics(target.metrics_url), "nv_gpu_utilization"))
    if copy_bandwidth_gbs is None and not gpu:
        copy_bandwidth_gbs = host_copy_bandwidth_gbs()
    weights = weight_bytes(info.gpt_model_path)
    warmup: list[RequestRecord] = []
    if settings.warmup:
        warm_settings = dataclasses.replace(settings, duration_s=None)
        warm_conc = min(settings.warmup, max(settings.concurrency))
        if progress:
            progress(f"[{label}] warm-up: {settings.warmup} requests at concurrency {warm_conc}")
        warm_indices = iter(range(-1, -settings.warmup - 1, -1))
        warmup = run_requests(
            target, workload, warm_indices, warm_conc, warm_settings, t0, fixed_length_input=info.fixed_length_input
        )
    levels = []
    for concurrency in settings.concurrency:
        if settings.requests is not None and settings.requests < concurrency:
            LOGGER.warning(
                "c=%d with only %d requests: the level never reaches its concurrency", concurrency, settings.requests
            )
        level = run_level(
            target,
            workload,
            concurrency,
            settings,
            t0,
            weights,
            copy_bandwidth_gbs,
            progress,
            f"{label} ",
            info.fixed_length_input,
        )
        levels.append(level)
        if progress:
            s = level.stats
            util = level.utilization.get("mean_pct")
            progress(
                f"[{label} c={concurrency}] {s.requests} requests, {s.errors} errors: "
                f"{s.requests_per_s:.2f} req/s, {s.output_tokens_per_s:.1f} tok/s, "
                f"latency avg {s.latency_avg_s:.3f} s P99 {s.latency_p99_s:.3f} s, "
                f"TTFT avg {s.ttft_avg_s * 1000:.0f} ms, mean engine batch "
                f"{fmt(level.engine.get('mean_batch'), '.2f')}, utilization "
                f"{fmt(util, '.1f')}% ({level.utilization.get('source')})"
            )
    manifest = None
    if repo is not None and (Path(repo) / "repository.json").exists():
        manifest = json.loads((Path(repo) / "repository.json").read_text())
    return ConfigResult(
        label=label,
        repo=str(repo) if repo is not None else None,
        repository_manifest=manifest,
        server={
            **dataclasses.asdict(info),
            "grpc_url": target.grpc_url,
            "metrics_url": target.metrics_url,
            "pid": target.pid,
            "weight_bytes": weights,
            "copy_bandwidth_gbs": copy_bandwidth_gbs,
            "gpu_metrics": gpu,
        },
        warmup=warmup,
        levels=levels,
    )
