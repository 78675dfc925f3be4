"""Load generator and benchmark report for the chat ensembles (gRPC streaming).

``python -m clients.bench`` sends a synthetic workload to a running server (or to
one it starts on a rendered CPU repository), at one or several concurrency
levels, and writes a report: every raw per-request figure as JSON, Markdown
tables and PNG plots, under ``results/<YYYYmmdd-HHMMSS>-<settings>/``.

Examples::

    # against a running server (make serve)
    python -m clients.bench --url localhost:8001 --concurrency 1,4,16 --requests 32 --output-tokens 32

    # start a CPU server on a repository, run, stop it
    python -m clients.bench --start-cpu-server --repo build/repo-cpu-tiny-mm --concurrency 4 --duration 30

    # before/after: the same workload against two repositories, one server at a time
    python -m clients.bench --start-cpu-server --compare build/repo-cpu-tiny-mm-bs1 build/repo-cpu-tiny-mm \\
        --concurrency 1,4,16 --requests 32 --input-tokens 96 --input-spread 16 --output-tokens 32 \\
        --image-share 0.25 --audio-share 0.25

The workload is closed-loop: ``concurrency`` workers each keep one gRPC stream
open and send their next request as soon as the previous one has finished. A
level ends after ``--requests`` requests or ``--duration`` seconds, whichever
comes first (requests in flight at the deadline are waited for); every
response wait is bounded by ``--timeout``. Request ``i`` is the same in every
level and every configuration (prompt, media, lengths come from ``seed`` and
``i``), so runs compare.

Server-side figures come from Triton itself: the statistics API (queue and
compute time per model, the batch sizes Triton's dynamic batcher formed), the
engine's own per-step batch metrics on ``/metrics``
(``mmtriton_engine_steps_total``, ``mmtriton_engine_step_sequences_total``,
``mmtriton_engine_step_batch_size_max``), and utilization sampled every 0.5 s:
``nv_gpu_utilization`` when the server exports it, otherwise the CPU time of
the server's process tree (server and python backend stubs). Beside it the
report gives engine decode steps/s and model-bandwidth utilization (weight bytes
x decode steps/s / copy bandwidth); NVML utilization alone says little.

Output length: when the chat ensembles have a ``min_tokens`` input (TensorRT-LLM's
name) or an ``ignore_eos`` input, every request sends it so that outputs have
exactly ``--output-tokens`` tokens. Without one, a request ends early when the model
emits its end token; the report counts those requests ("ended short") and every
figure uses the actual token counts.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import queue
import re
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clients.bench_stats import RequestTiming, RunStats, summarize
from clients.llm import Sampling, ensemble_for, grpc_chunk, grpc_inputs, request_values

LOGGER = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
SAMPLE_PERIOD_S = 0.5
# The tensorrt_llm model pushes its engine counters to /metrics every 0.2 s.
METRICS_SETTLE_S = 0.5
PROGRESS_PERIOD_S = 2.0
# Chat-ensemble inputs that force max_tokens output tokens, used when the server has one:
# TensorRT-LLM's `min_tokens` (set to max_tokens) or an `ignore_eos` flag.
FIXED_LENGTH_INPUTS = ("min_tokens", "ignore_eos")

_WORDS = (
    "the of and to in is was for on that with as by at from it an be this which or are have had not but "
    "all were when there can more one their been has if would will each about how up out them then she "
    "many some so these her him into time has look two more write go see number no way could people my "
    "than first water been call who oil its now find long down day did get come made may part over new "
    "sound take only little work know place year live me back give most very after thing our just name "
    "good sentence man think say great where help through much before line right too mean old any same "
    "tell boy follow came want show also around form three small set put end does another well large "
    "must big even such because turn here why ask went men read need land different home us move try "
    "kind hand picture again change off play spell air away animal house point page letter mother "
    "answer found study still learn should world high every near add food between own below country "
    "plant last school father keep tree never start city earth eye light thought head under story saw"
).split()


# ---------------------------------------------------------------------------- settings


@dataclass
class BenchSettings:
    """What one benchmark run sends.

    Attributes:
        concurrency: Concurrency levels to run, in order.
        requests: Measured requests per level (None: bounded by ``duration_s`` only).
        duration_s: Longest time a level issues new requests (None: bounded by ``requests``).
        input_tokens: Mean prompt length in tokens of the bundle's tokenizer (the user
            text; the server adds the chat template and one row per image/audio embedding).
        input_spread: Standard deviation of the prompt length.
        output_tokens: ``max_tokens`` of every request.
        image_share: Probability that a request carries an image.
        audio_share: Probability that a request carries an audio clip (independent
            of the image: some carry both).
        warmup: Requests sent once per server before the first level, not measured.
        seed: Seed of the workload (prompts, lengths, media).
        timeout_s: Longest wait for any single response.
    """

    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    requests: int | None = 32
    duration_s: float | None = None
    input_tokens: int = 96
    input_spread: float = 16.0
    output_tokens: int = 32
    image_share: float = 0.25
    audio_share: float = 0.25
    warmup: int = 2
    seed: int = 0
    timeout_s: float = 120.0

    def validate(self) -> None:
        """Raise ValueError if a setting is out of range."""
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.requests is None and self.duration_s is None:
            raise ValueError("give --requests and/or --duration: a run must stop by itself")
        if self.requests is not None and self.requests < 1:
            raise ValueError("--requests must be >= 1")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("--duration must be > 0")
        if self.input_tokens < 1 or self.input_spread < 0 or self.output_tokens < 1:
            raise ValueError("--input-tokens and --output-tokens must be >= 1, --input-spread >= 0")
        for name in ("image_share", "audio_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1]")
        if self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError("--warmup must be >= 0 and --timeout > 0")

    def slug(self) -> str:
        """Short folder-name form of the settings."""
        parts = [
            "c" + "-".join(str(c) for c in self.concurrency),
            f"in{self.input_tokens}",
            f"out{self.output_tokens}",
            f"img{round(self.image_share * 100)}",
            f"aud{round(self.audio_share * 100)}",
        ]
        if self.requests is not None:
            parts.append(f"n{self.requests}")
        if self.duration_s is not None:
            parts.append(f"d{self.duration_s:g}s")
        return "-".join(parts)


# ---------------------------------------------------------------------------- workload


@dataclass
class PlannedRequest:
    """One request of the workload (the same for a given seed and index everywhere).

    Attributes:
        index: Position in the workload.
        prompt: User text.
        prompt_tokens: Its length in tokens of the bundle's tokenizer.
        image: Encoded image bytes, or None.
        audio: Encoded audio bytes, or None.
    """

    index: int
    prompt: str
    prompt_tokens: int
    image: bytes | None
    audio: bytes | None

    @property
    def model(self) -> str:
        """The chat ensemble this request goes to."""
        return ensemble_for(self.image is not None, self.audio is not None)


class Workload:
    """Deterministic synthetic requests: prompts of a target token length, optional media.

    Args:
        tokenizer: A Hugging Face tokenizer (the bundle's), used to size prompts.
        settings: Lengths, media shares and seed.
        max_prompt_tokens: Upper bound on a prompt's length (leave room for the chat
            template and the media rows within the server's ``max_input_len``).
        media_pool: Distinct images and audio clips to draw from (made once, up front,
            so the client spends no CPU on them during a run).
    """

    def __init__(self, tokenizer: Any, settings: BenchSettings, max_prompt_tokens: int, media_pool: int = 4) -> None:
        from mmtriton.samples import encode_audio, encode_image, synthetic_audio, synthetic_image

        self.tokenizer = tokenizer
        self.settings = settings
        self.max_prompt_tokens = max(1, max_prompt_tokens)
        sizes = [(640, 480), (320, 240), (800, 600), (256, 256)]
        seconds = [3.0, 2.0, 4.0, 2.5]
        self.images = [
            encode_image(synthetic_image(*sizes[i % len(sizes)], seed=settings.seed + i), "JPEG")
            for i in range(media_pool)
        ]
        self.audios = [
            encode_audio(synthetic_audio(16000, seconds[i % len(seconds)], seed=settings.seed + i), 16000, "WAV")
            for i in range(media_pool)
        ]

    def request(self, index: int) -> PlannedRequest:
        """The request at ``index`` (negative indices are warm-up requests)."""
        rng = np.random.default_rng([self.settings.seed, index & 0xFFFFFFFF, 1 if index < 0 else 0])
        target = int(round(rng.normal(self.settings.input_tokens, self.settings.input_spread)))
        target = min(max(1, target), self.max_prompt_tokens)
        has_image = bool(rng.random() < self.settings.image_share)
        has_audio = bool(rng.random() < self.settings.audio_share)
        prompt = self._prompt(rng, target)
        return PlannedRequest(
            index=index,
            prompt=prompt,
            prompt_tokens=self.count_tokens(prompt),
            image=self.images[int(rng.integers(len(self.images)))] if has_image else None,
            audio=self.audios[int(rng.integers(len(self.audios)))] if has_audio else None,
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` without special tokens."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, rng: np.random.Generator, target: int) -> str:
        # Random words, cut right after the target-th token (offsets of a fast tokenizer);
        # re-tokenizing the cut text gives the target length up to a merge at the cut.
        n_words = max(8, target)
        while True:
            words = [_WORDS[i] for i in rng.integers(len(_WORDS), size=n_words)]
            text = " ".join(words)
            if getattr(self.tokenizer, "is_fast", False):
                enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                if len(enc["input_ids"]) >= target:
                    return text[: enc["offset_mapping"][target - 1][1]].strip()
            else:
                out: list[str] = []
                for word in words:
                    out.append(word)
                    if self.count_tokens(" ".join(out)) >= target:
                        return " ".join(out)
            n_words *= 2


# ---------------------------------------------------------------------------- server access


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


def _grpc_client(url: str) -> Any:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url)


def server_info(url: str) -> ServerInfo:
    """Read the server version and the preprocessing / tensorrt_llm configs over gRPC."""
    client = _grpc_client(url)
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
    client = _grpc_client(url)
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


# ---------------------------------------------------------------------------- utilization


class _ProcessTreeCpu:
    """CPU seconds used by a process and all its descendants (per-pid deltas)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self._seen: dict[tuple[int, float], float] = {}
        self._baseline = True  # the first update only records where each process stands
        self.total_s = 0.0
        self.update()
        self._baseline = False

    def update(self) -> float:
        """Add the CPU time used since the last call; return the running total (seconds)."""
        psutil = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return self.total_s
        for proc in procs:
            try:
                key = (proc.pid, proc.create_time())
                times = proc.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            # A process first seen after the baseline started during the run: all its time counts.
            previous = self._seen.get(key, used if self._baseline else 0.0)
            self.total_s += max(0.0, used - previous)
            self._seen[key] = used
        return self.total_s


class UtilizationSampler:
    """Samples utilization every ``period_s`` in a thread.

    Each sample has ``t_s`` (seconds since ``t0``), ``gpu_util_pct`` (mean of
    ``nv_gpu_utilization`` over GPUs, when the server exports it), ``server_cpu_pct``
    (CPU time of the server process tree over the interval, in % of all cores of this
    machine), ``client_cpu_pct`` (this process, same unit) and ``in_flight`` (the
    engine's running requests).

    Args:
        target: Server to sample (metrics URL and pid).
        t0: ``time.perf_counter()`` value that sample times are relative to.
        period_s: Sampling period.
    """

    def __init__(self, target: ServerTarget, t0: float, period_s: float = SAMPLE_PERIOD_S) -> None:
        import psutil

        self.target = target
        self.t0 = t0
        self.period_s = period_s
        self.samples: list[dict[str, float | None]] = []
        self.cores = psutil.cpu_count() or 1
        self._client = psutil.Process()
        self._server: _ProcessTreeCpu | None = None
        if target.pid is not None:
            try:
                self._server = _ProcessTreeCpu(target.pid)
            except psutil.Error as err:
                LOGGER.warning("cannot watch server pid %s: %s", target.pid, err)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="utilization", daemon=True)
        self._last: tuple[float, float, float] | None = None
        self._start_cpu: tuple[float, float, float] | None = None

    def _cpu(self) -> tuple[float, float, float]:
        server = self._server.update() if self._server is not None else math.nan
        times = self._client.cpu_times()
        return time.perf_counter(), server, times.user + times.system

    def _sample(self) -> None:
        now, server, client = self._cpu()
        metrics = scrape_metrics(self.target.metrics_url, timeout_s=2.0)
        gpu = metric_values(metrics, "nv_gpu_utilization")
        sample: dict[str, float | None] = {
            "t_s": now - self.t0,
            "gpu_util_pct": 100.0 * float(np.mean(gpu)) if gpu else None,
            "server_cpu_pct": None,
            "client_cpu_pct": None,
            "in_flight": metric_sum(metrics, "mmtriton_engine_requests_in_flight"),
        }
        if self._last is not None and now > self._last[0]:
            wall = (now - self._last[0]) * self.cores
            if not math.isnan(server):
                sample["server_cpu_pct"] = 100.0 * (server - self._last[1]) / wall
            sample["client_cpu_pct"] = 100.0 * (client - self._last[2]) / wall
        self._last = (now, server, client)
        self.samples.append(sample)

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def start(self) -> None:
        """Take the first sample and start the thread."""
        self._start_cpu = self._cpu()
        self._last = self._start_cpu
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop, take a last sample, and summarize.

        Returns:
            ``source`` (``gpu``, ``server_cpu`` or ``none``), ``mean_pct`` and ``max_pct``
            of that source over the run (for CPU the mean is exact: CPU seconds of the
            tree over wall seconds x cores), the client's mean CPU %, and ``cores``.
        """
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample()  # the CPU totals at the end, for the exact mean
        if len(self.samples) >= 2 and self.samples[-1]["t_s"] - self.samples[-2]["t_s"] < self.period_s / 4:
            self.samples.pop()  # too short an interval to plot as a rate
        gpu = [s["gpu_util_pct"] for s in self.samples if s["gpu_util_pct"] is not None]
        server = [s["server_cpu_pct"] for s in self.samples if s["server_cpu_pct"] is not None]
        summary: dict[str, Any] = {"cores": self.cores, "samples": len(self.samples)}
        assert self._start_cpu is not None and self._last is not None
        wall = (self._last[0] - self._start_cpu[0]) * self.cores
        summary["client_cpu_mean_pct"] = 100.0 * (self._last[2] - self._start_cpu[2]) / wall if wall > 0 else None
        server_mean = (
            100.0 * (self._last[1] - self._start_cpu[1]) / wall if wall > 0 and self._server is not None else None
        )
        summary["server_cpu_mean_pct"] = server_mean
        if gpu:
            summary.update(source="gpu", mean_pct=float(np.mean(gpu)), max_pct=float(np.max(gpu)))
        elif server:
            summary.update(source="server_cpu", mean_pct=server_mean, max_pct=float(np.max(server)))
        else:
            summary.update(source="none", mean_pct=None, max_pct=None)
        return summary


def host_copy_bandwidth_gbs(megabytes: int = 128, repeats: int = 3) -> float:
    """Host memory copy bandwidth in GB/s, counting bytes read plus bytes written (best of ``repeats``)."""
    src = np.ones(megabytes * 2**20, dtype=np.uint8)
    dst = np.zeros_like(src)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def weight_bytes(model_dir: str | None) -> int | None:
    """Bytes of the LLM's weight files (``*.safetensors``, ``*.bin``, ``*.engine``) in ``model_dir``."""
    if not model_dir or not Path(model_dir).is_dir():
        return None
    files = [p for ext in ("*.safetensors", "*.bin", "*.engine") for p in Path(model_dir).glob(ext)]
    return sum(p.stat().st_size for p in files) or None


# ---------------------------------------------------------------------------- load generation


@dataclass
class RequestRecord:
    """Everything recorded for one request (times in seconds from the configuration's start, ``t0``).

    Attributes:
        index: Workload index (negative: warm-up).
        model: Ensemble it went to.
        request_id: The id sent with it.
        prompt_tokens: Client-side token count of the user text.
        image_bytes, audio_bytes: Size of the media sent (0: none).
        max_tokens: ``max_tokens`` sent.
        send_s, end_s: Send time and last response time.
        token_times_s: Arrival time of each output token.
        output_tokens: Output token ids received (counted by the client).
        server_input_tokens: ``num_input_tokens`` the server returned (chat template and
            media rows included).
        server_output_tokens: ``num_output_tokens`` of the last response.
        error: Why it failed, or None.
    """

    index: int
    model: str
    request_id: str
    prompt_tokens: int
    image_bytes: int
    audio_bytes: int
    max_tokens: int
    send_s: float
    end_s: float
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    server_input_tokens: int | None = None
    server_output_tokens: int | None = None
    error: str | None = None

    def timing(self) -> RequestTiming:
        """The timings :mod:`clients.bench_stats` works on."""
        return RequestTiming(self.send_s, self.end_s, list(self.token_times_s), self.output_tokens, self.error)


class _StreamSession:
    """One gRPC stream reused for consecutive requests (one per worker).

    After an error or a timeout the stream is closed (cancelling whatever was in
    flight on it) and the next request opens a new one.
    """

    def __init__(self, url: str, timeout_s: float, fixed_length_input: str | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.fixed_length_input = fixed_length_input
        self._client: Any = None
        self._responses: queue.SimpleQueue[tuple[float, Any, Any]] = queue.SimpleQueue()

    def _callback(self, result: Any, error: Any) -> None:
        self._responses.put((time.perf_counter(), result, error))

    def _open(self) -> None:
        self._responses = queue.SimpleQueue()
        self._client = _grpc_client(self.url)
        self._client.start_stream(callback=self._callback)

    def close(self) -> None:
        """Close the stream and its channel."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.stop_stream(cancel_requests=True)
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def send(self, planned: PlannedRequest, max_tokens: int, request_id: str, t0: float) -> RequestRecord:
        """Send one request and follow its stream to the final response.

        Args:
            planned: The request.
            max_tokens: Output tokens asked for.
            request_id: Id sent with it.
            t0: ``time.perf_counter()`` value the record's times are relative to.
        """
        sampling = Sampling(max_tokens=max_tokens, ignore_eos=self.fixed_length_input == "ignore_eos")
        values = request_values(planned.prompt, planned.image, planned.audio, sampling, stream=True)
        if self.fixed_length_input == "min_tokens":
            values["min_tokens"] = np.array([[max_tokens]], dtype=np.int32)
        inputs = grpc_inputs(values)
        record = RequestRecord(
            index=planned.index,
            model=planned.model,
            request_id=request_id,
            prompt_tokens=planned.prompt_tokens,
            image_bytes=len(planned.image or b""),
            audio_bytes=len(planned.audio or b""),
            max_tokens=max_tokens,
            send_s=0.0,
            end_s=0.0,
        )
        try:
            if self._client is None:
                self._open()
            record.send_s = time.perf_counter() - t0
            self._client.async_stream_infer(
                planned.model, inputs, request_id=request_id, enable_empty_final_response=True
            )
            while True:
                try:
                    arrived, result, error = self._responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"no response within {self.timeout_s:.0f} s") from None
                if error is not None:
                    raise RuntimeError(str(error))
                response = result.get_response()
                if response.id and response.id != request_id:
                    continue  # a late response of an earlier request on this stream
                chunk = grpc_chunk(result)
                if chunk is not None:
                    record.token_times_s.extend([arrived - t0] * len(chunk.token_ids))
                    record.output_tokens += len(chunk.token_ids)
                    record.server_input_tokens = chunk.num_input_tokens
                    record.server_output_tokens = chunk.num_output_tokens
                if response.parameters["triton_final_response"].bool_param:
                    record.end_s = arrived - t0
                    return record
        except Exception as err:  # noqa: BLE001 - every failure is recorded, the run goes on
            record.error = f"{type(err).__name__}: {err}"
            record.end_s = time.perf_counter() - t0
            self.close()
            return record


Progress = Callable[[str], None]


def run_requests(
    target: ServerTarget,
    workload: Workload,
    indices: Iterator[int],
    concurrency: int,
    settings: BenchSettings,
    t0: float,
    deadline: float | None = None,
    progress: Progress | None = None,
    label: str = "",
    fixed_length_input: str | None = None,
) -> list[RequestRecord]:
    """Closed-loop load: ``concurrency`` workers take the next index until none is left or the deadline passes.

    Args:
        target: Server to send to.
        workload: Request factory.
        indices: Workload indices to send, in order (may be endless when ``deadline`` is set).
        concurrency: Workers (requests in flight at once).
        settings: Output length and timeout.
        t0: Time origin of the records.
        deadline: ``time.perf_counter()`` after which no new request starts.
        progress: Called with a progress line when a request completes at least
            ``PROGRESS_PERIOD_S`` seconds after the previous line.
        label: Prefix of the progress lines.
        fixed_length_input: Chat-ensemble input to send so outputs have ``max_tokens`` tokens.

    Returns:
        One record per request sent, in completion order.
    """
    lock = threading.Lock()
    records: list[RequestRecord] = []
    run_tag = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    last_line = [started]

    def next_index() -> int | None:
        with lock:
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            return next(indices, None)

    def worker() -> None:
        session = _StreamSession(target.grpc_url, settings.timeout_s, fixed_length_input)
        try:
            while (index := next_index()) is not None:
                planned = workload.request(index)
                record = session.send(planned, settings.output_tokens, f"bench-{run_tag}-{index}", t0)
                with lock:
                    records.append(record)
                    done = len(records)
                    errors = sum(1 for r in records if r.error)
                    tokens = sum(r.output_tokens for r in records if not r.error)
                if record.error:
                    LOGGER.error("request %d failed: %s", index, record.error)
                now = time.perf_counter()
                if progress is not None and now - last_line[0] >= PROGRESS_PERIOD_S:
                    last_line[0] = now
                    elapsed = now - started
                    progress(
                        f"[{label}c={concurrency}] {done} done, {errors} errors, "
                        f"{done / elapsed:.2f} req/s, {tokens / elapsed:.1f} tok/s, {elapsed:.1f} s"
                    )
        finally:
            session.close()

    threads = [threading.Thread(target=worker, name=f"bench-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records


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


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer in ``path``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


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
    # Room for the chat template and up to 256 media rows (a 64-patch image + a few seconds of audio).
    max_prompt = (info.max_input_len - 320) if info.max_input_len else settings.input_tokens * 4
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
                f"{_fmt(level.engine.get('mean_batch'), '.2f')}, utilization "
                f"{_fmt(util, '.1f')}% ({level.utilization.get('source')})"
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


def run_with_cpu_server(
    repo: Path,
    settings: BenchSettings,
    *,
    label: str,
    tokenizer: str | Path | None = None,
    copy_bandwidth_gbs: float | None = None,
    progress: Progress | None = None,
) -> ConfigResult:
    """Start ``tritonserver`` on ``repo`` (free ports), run :func:`run_config`, stop it.

    The server log is kept in the result (``server_log``).
    """
    from mmtriton.server import TritonServer

    work_dir = Path(tempfile.mkdtemp(prefix=f"bench-server-{label}-"))
    server = TritonServer(model_repository=repo, work_dir=work_dir, pythonpath=[ROOT])
    if progress:
        progress(f"[{label}] starting tritonserver on {repo}")
    server.start()
    try:
        assert server.process is not None
        target = ServerTarget(server.grpc_url, server.metrics_url, server.process.pid)
        result = run_config(
            target,
            settings,
            label=label,
            repo=repo,
            tokenizer=tokenizer,
            copy_bandwidth_gbs=copy_bandwidth_gbs,
            progress=progress,
        )
    except Exception:
        LOGGER.error("server log tail (%s):\n%s", repo, server.log_tail(40))
        raise
    finally:
        server.stop()
        log = server.log_tail(100_000)
        shutil.rmtree(work_dir, ignore_errors=True)
    result.server_log = log
    return result


def _fmt(value: float | None, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


# ---------------------------------------------------------------------------- CLI


def _concurrency(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,4,16, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark CLI; returns 0, 1 (setup failed) or 3 (requests failed)."""
    parser = argparse.ArgumentParser(prog="python -m clients.bench", description=__doc__.splitlines()[0])
    where = parser.add_argument_group("server")
    where.add_argument("--url", default="localhost:8001", help="gRPC host:port of a running server")
    where.add_argument("--metrics-url", help="Prometheus URL (default: http://<host of --url>:8002/metrics)")
    where.add_argument(
        "--server-pid", type=int, help="pid of a running server, for CPU utilization of its process tree"
    )
    where.add_argument(
        "--start-cpu-server", action="store_true", help="start tritonserver on --repo (or each --compare repo)"
    )
    where.add_argument("--repo", type=Path, help="rendered model repository (with --start-cpu-server)")
    where.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("BEFORE_REPO", "AFTER_REPO"),
        help="run the same workload against two repositories, one server at a time",
    )
    where.add_argument("--tokenizer", help="tokenizer folder (default: the server's preprocessing tokenizer_dir)")
    load = parser.add_argument_group("workload")
    load.add_argument("--concurrency", type=_concurrency, default=[1, 4, 16], help="one value or a sweep, e.g. 1,4,16")
    load.add_argument("--requests", type=int, help="measured requests per level (default 32 unless --duration)")
    load.add_argument("--duration", type=float, help="seconds per level (new requests stop after it)")
    load.add_argument("--input-tokens", type=int, default=96, help="mean prompt length in tokens")
    load.add_argument("--input-spread", type=float, default=16.0, help="standard deviation of the prompt length")
    load.add_argument("--output-tokens", type=int, default=32, help="max_tokens of every request")
    load.add_argument("--image-share", type=float, default=0.25, help="share of requests with an image")
    load.add_argument("--audio-share", type=float, default=0.25, help="share of requests with an audio clip")
    load.add_argument("--warmup", type=int, default=2, help="unmeasured requests before the first level")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--timeout", type=float, default=120.0, help="longest wait for one response (s)")
    out = parser.add_argument_group("report")
    out.add_argument("--results-dir", type=Path, default=ROOT / "results")
    out.add_argument(
        "--copy-bandwidth-gbs",
        type=float,
        help="device copy bandwidth, read + write, for model-bandwidth utilization "
        "(e.g. 3020 for one H100; default: measured on the host for a CPU server)",
    )
    args = parser.parse_args(argv)
    from clients.bench_report import comparison, comparison_table, report_dir, total_errors, write_report

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.compare and not args.start_cpu_server:
        parser.error("--compare needs --start-cpu-server (it starts one server per repository)")
    if args.start_cpu_server and not (args.repo or args.compare):
        parser.error("--start-cpu-server needs --repo or --compare")
    settings = BenchSettings(
        concurrency=args.concurrency,
        requests=args.requests if args.requests is not None or args.duration is not None else 32,
        duration_s=args.duration,
        input_tokens=args.input_tokens,
        input_spread=args.input_spread,
        output_tokens=args.output_tokens,
        image_share=args.image_share,
        audio_share=args.audio_share,
        warmup=args.warmup,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    try:
        settings.validate()
    except ValueError as err:
        parser.error(str(err))

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    common = {"tokenizer": args.tokenizer, "copy_bandwidth_gbs": args.copy_bandwidth_gbs, "progress": progress}
    configs: list[ConfigResult] = []
    failed = False
    try:
        if args.compare:
            for label, repo in zip(("before", "after"), args.compare, strict=True):
                configs.append(run_with_cpu_server(repo, settings, label=label, **common))
        elif args.start_cpu_server:
            configs.append(run_with_cpu_server(args.repo, settings, label=args.repo.name, **common))
        else:
            host = args.url.rsplit(":", 1)[0]
            target = ServerTarget(args.url, args.metrics_url or f"http://{host}:8002/metrics", args.server_pid)
            configs.append(run_config(target, settings, label="run", repo=args.repo, **common))
    except Exception as err:  # noqa: BLE001 - CLI boundary: report and exit non-zero
        LOGGER.error("benchmark failed: %s", err)
        failed = True
        if not configs:
            return 1
    out_dir = report_dir(args.results_dir, settings, bool(args.compare))
    paths = write_report(configs, settings, out_dir)
    if len(configs) == 2:
        for block in comparison(configs[0], configs[1]):
            print(comparison_table(block) + "\n")
    else:
        for level in configs[0].levels:
            st = level.stats
            print(
                f"c={level.concurrency}: {st.requests_per_s:.3f} req/s, {st.output_tokens_per_s:.1f} tok/s, "
                f"latency avg {st.latency_avg_s:.3f} s, P99 {st.latency_p99_s:.3f} s, "
                f"utilization {_fmt(level.utilization.get('mean_pct'), '.1f')}% ({level.utilization.get('source')})"
            )
    print(f"report: {out_dir} ({', '.join(p.name for p in paths.values())})")
    errors = total_errors(configs)
    if errors:
        banner = "!" * 78
        print(
            f"{banner}\n!!! {errors} REQUEST(S) FAILED: the figures are not valid. See {paths['md']}\n{banner}",
            file=sys.stderr,
        )
        return 3
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
