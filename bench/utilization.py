"""Utilization sampling (GPU from ``/metrics``, CPU of the server's process tree), copy bandwidth, weight size."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.triton_stats import ServerTarget, metric_sum, metric_values, scrape_metrics

LOGGER = logging.getLogger(__name__)
SAMPLE_PERIOD_S = 0.5
UTIL_METRIC = "nv_gpu_utilization"
MEM_USED_METRIC = "nv_gpu_memory_used_bytes"
MEM_TOTAL_METRIC = "nv_gpu_memory_total_bytes"
_UUID_LABEL = re.compile(r'gpu_uuid="([^"]*)"')


def gpu_figures(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per-GPU utilization and memory from parsed ``/metrics`` (:func:`bench.triton_stats.parse_metrics`).

    Returns:
        ``{gpu_uuid: {"util_pct", "memory_used_bytes", "memory_total_bytes"}}``; a GPU
        has only the keys its series were found for.
    """
    names = {UTIL_METRIC: "util_pct", MEM_USED_METRIC: "memory_used_bytes", MEM_TOTAL_METRIC: "memory_total_bytes"}
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        name, _, labels = key.partition("{")
        if name not in names:
            continue
        found = _UUID_LABEL.search(labels)
        if not found:
            continue
        out.setdefault(found.group(1), {})[names[name]] = 100.0 * value if name == UTIL_METRIC else value
    return out


def summarize_gpus(samples: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and max per GPU over the ``gpus`` entries of a level's samples."""
    series: dict[str, dict[str, list[float]]] = {}
    for sample in samples:
        for uuid, figures in (sample.get("gpus") or {}).items():
            per = series.setdefault(uuid, {})
            for key, value in figures.items():
                per.setdefault(key, []).append(float(value))
    out: dict[str, dict[str, Any]] = {}
    for uuid, per in series.items():
        util, used, total = per.get("util_pct", []), per.get("memory_used_bytes", []), per.get("memory_total_bytes", [])
        out[uuid] = {
            "samples": max(len(util), len(used)),
            "util_mean_pct": float(np.mean(util)) if util else None,
            "util_max_pct": float(np.max(util)) if util else None,
            "memory_used_mean_bytes": float(np.mean(used)) if used else None,
            "memory_used_max_bytes": float(np.max(used)) if used else None,
            "memory_total_bytes": float(np.max(total)) if total else None,
        }
    return out


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
    machine), ``client_cpu_pct`` (this process, same unit), ``in_flight`` (the
    engine's running requests) and ``gpus`` (:func:`gpu_figures`: utilization and memory
    of each GPU, or None without GPU metrics). Triton refreshes its GPU metrics every
    ``--metrics-interval-ms`` (2000 ms by default), so consecutive samples may repeat a value.

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
        gpu = metric_values(metrics, UTIL_METRIC)
        sample: dict[str, float | None] = {
            "t_s": now - self.t0,
            "gpu_util_pct": 100.0 * float(np.mean(gpu)) if gpu else None,
            "server_cpu_pct": None,
            "client_cpu_pct": None,
            "in_flight": metric_sum(metrics, "mmtriton_engine_requests_in_flight"),
            "gpus": gpu_figures(metrics) or None,  # type: ignore[dict-item]
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
            tree over wall seconds x cores), the client's mean CPU %, ``cores``, and ``gpus``
            (:func:`summarize_gpus`, per GPU; empty without GPU metrics).
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
        summary["gpus"] = summarize_gpus(self.samples)  # type: ignore[arg-type]
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
