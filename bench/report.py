"""Benchmark report: ``report.json`` (every raw figure), ``report.md`` (tables) and PNG plots.

Written by ``python -m bench`` under ``results/<YYYYmmdd-HHMMSS>-<settings>/``:

* ``report.json``: settings, versions (Python, tritonclient, nvidia-pytriton, transformers,
  torch, ...), git commit, the hardware the benchmark ran on (GPU model, count, driver and
  CUDA version when there are GPUs; CPU model and cores always; see :func:`hardware_info`),
  and per configuration and concurrency level the summary
  figures, the server-side figures, the utilization samples and every request's raw
  timings (send, each token's arrival, end, token counts, error).
* ``report.md``: the same as tables, with the before/after table in comparison mode, and
  a ``Hardware:`` line.
* ``throughput_latency.png``: output tokens/s and P99 latency against concurrency.
* ``utilization.png``: utilization over time, one panel per configuration.
* ``tritonserver-<label>.log``: the server log of each server the benchmark started.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.load import RequestRecord
from bench.run import ConfigResult, LevelResult
from bench.stats import fmt, percent_change
from bench.workload import BenchSettings

__all__ = [
    "comparison",
    "comparison_table",
    "cpu_model",
    "hardware_info",
    "hardware_line",
    "markdown_report",
    "plot_report",
    "report_dict",
    "report_dir",
    "total_errors",
    "write_report",
]


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("tritonclient", "nvidia-pytriton", "transformers", "torch", "numpy", "psutil", "matplotlib"):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _git() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


LOGGER = logging.getLogger(__name__)


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str | None:
    """The CPU's model name, or None when nothing says.

    The first ``model name`` line of ``/proc/cpuinfo`` (x86), else its ``Model`` or
    ``Hardware`` line (Arm), else :func:`platform.processor`.
    """
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware"):
        found = re.search(rf"^{key}\s*:\s*(.+?)\s*$", text, flags=re.MULTILINE)
        if found:
            return found.group(1)
    return platform.processor() or None


def _nvidia_smi_gpus() -> dict[str, Any] | None:
    """GPU model, memory, driver and CUDA version from ``nvidia-smi``; None when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        fields = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]
        query = subprocess.run([smi, *fields], capture_output=True, text=True, check=True, timeout=30).stdout
        banner = subprocess.run([smi], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as err:
        LOGGER.warning("nvidia-smi failed (%s); the report names no GPU from it", err)
        return None
    gpus = []
    for line in query.strip().splitlines():
        name, memory, driver = (part.strip() for part in line.split(",", 2))
        memory_mib = int(float(memory)) if memory[:1].isdigit() else None
        gpus.append({"name": name, "memory_mib": memory_mib, "driver_version": driver})
    cuda = re.search(r"CUDA Version:\s*([0-9.]+)", banner)
    return {
        "source": "nvidia-smi",
        "gpus": gpus,
        "driver_version": gpus[0]["driver_version"] if gpus else None,
        "cuda_version": cuda.group(1) if cuda else None,
    }


def _torch_gpus() -> dict[str, Any] | None:
    """GPU models from ``torch.cuda`` (CUDA version: the runtime torch was built with); None without CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append({"name": props.name, "memory_mib": props.total_memory // (1 << 20), "driver_version": None})
    return {"source": "torch.cuda", "gpus": gpus, "driver_version": None, "cuda_version": torch.version.cuda}


def hardware_info() -> dict[str, Any]:
    """The hardware of the machine running the benchmark (and any server it started).

    GPUs come from ``nvidia-smi`` when it is on ``PATH``, else from ``torch.cuda``
    when CUDA is available; the CPU is always recorded. Against ``--url`` of
    another machine this describes the client's machine, not the server's.

    Returns:
        ``gpu_model`` (the first GPU's name; a mixed set lists every name in ``gpus``),
        ``gpu_count``, ``gpus``, ``driver_version``, ``cuda_version``, ``gpu_source``
        (``nvidia-smi``, ``torch.cuda`` or None), ``cpu_model``, ``cpu_cores``
        (:func:`os.cpu_count`), ``machine``.
    """
    none = {"source": None, "gpus": [], "driver_version": None, "cuda_version": None}
    gpu = _nvidia_smi_gpus() or _torch_gpus() or none
    gpus = gpu["gpus"]
    return {
        "gpu_model": gpus[0]["name"] if gpus else None,
        "gpu_count": len(gpus),
        "gpus": gpus,
        "driver_version": gpu["driver_version"],
        "cuda_version": gpu["cuda_version"],
        "gpu_source": gpu["source"],
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "machine": platform.machine(),
    }


def hardware_line(hw: dict[str, Any]) -> str:
    """One Markdown line naming the hardware of :func:`hardware_info`."""
    cpu = f"CPU {hw['cpu_model'] or 'unknown model'}, {hw['cpu_cores']} cores ({hw['machine']})"
    if not hw["gpu_count"]:
        return f"Hardware: no GPU; {cpu}."
    names = sorted({g["name"] for g in hw["gpus"]})
    driver = f"driver {hw['driver_version']}" if hw["driver_version"] else "driver unknown"
    cuda = f"CUDA {hw['cuda_version']}" if hw["cuda_version"] else "CUDA unknown"
    return f"Hardware: {hw['gpu_count']} × {' + '.join(names)} ({driver}, {cuda}; from {hw['gpu_source']}); {cpu}."


COMPARISON_ROWS: tuple[tuple[str, str, str], ...] = (
    ("avg latency (s)", "latency_avg_s", ".3f"),
    ("P99 latency (s)", "latency_p99_s", ".3f"),
    ("QPS (requests/s)", "requests_per_s", ".3f"),
    ("output tokens/s", "output_tokens_per_s", ".1f"),
    ("utilization (%)", "utilization", ".1f"),
    ("TTFT avg (s)", "ttft_avg_s", ".3f"),
    ("mean engine batch", "mean_batch", ".2f"),
)


def _level_value(level: LevelResult, key: str) -> float | None:
    if key == "utilization":
        return level.utilization.get("mean_pct")
    if key == "mean_batch":
        return level.engine.get("mean_batch")
    value = getattr(level.stats, key)
    return None if isinstance(value, float) and math.isnan(value) else value


def comparison(before: ConfigResult, after: ConfigResult) -> list[dict[str, Any]]:
    """Before/after rows per concurrency level present in both."""
    out = []
    after_levels = {level.concurrency: level for level in after.levels}
    for b in before.levels:
        a = after_levels.get(b.concurrency)
        if a is None:
            continue
        rows = []
        for name, key, _ in COMPARISON_ROWS:
            vb, va = _level_value(b, key), _level_value(a, key)
            change = percent_change(vb, va)
            rows.append(
                {
                    "metric": name,
                    "key": key,
                    "before": vb,
                    "after": va,
                    "change_pct": None if math.isnan(change) else change,
                }
            )
        out.append({"concurrency": b.concurrency, "rows": rows})
    return out


def comparison_table(block: dict[str, Any], before: str = "before", after: str = "after") -> str:
    """One comparison block as a Markdown table."""
    specs = {name: spec for name, _, spec in COMPARISON_ROWS}
    lines = [f"| concurrency {block['concurrency']} | {before} | {after} | change |", "|---|---:|---:|---:|"]
    for row in block["rows"]:
        spec = specs[row["metric"]]
        change = row["change_pct"]
        lines.append(
            f"| {row['metric']} | {fmt(row['before'], spec)} | {fmt(row['after'], spec)} | "
            f"{'n/a' if change is None else f'{change:+.1f}%'} |"
        )
    return "\n".join(lines)


def _record_json(record: RequestRecord) -> dict[str, Any]:
    data = dataclasses.asdict(record)
    for key in ("send_s", "end_s"):
        data[key] = round(data[key], 6)
    data["token_times_s"] = [round(t, 6) for t in record.token_times_s]
    return data


def _level_json(level: LevelResult) -> dict[str, Any]:
    return {
        "concurrency": level.concurrency,
        "stats": level.stats.to_dict(),
        "start_s": level.start_s,
        "end_s": level.end_s,
        "short_outputs": level.short_outputs,
        "token_count_mismatches": level.token_count_mismatches,
        "engine": level.engine,
        "model_bandwidth_utilization_pct": level.mbu_pct,
        "utilization": level.utilization,
        "utilization_samples": level.samples,
        "models": {
            name: {**m, "batch_sizes": {str(k): v for k, v in m["batch_sizes"].items()}}
            for name, m in level.models.items()
        },
        "requests": [_record_json(r) for r in level.records],
    }


def total_errors(configs: Sequence[ConfigResult]) -> int:
    """Failed requests over every level and warm-up of every configuration."""
    return sum(level.stats.errors for c in configs for level in c.levels) + sum(
        1 for c in configs for r in c.warmup if r.error
    )


def report_dict(
    configs: Sequence[ConfigResult], settings: BenchSettings, hardware: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The whole report as JSON-ready data (``hardware``: :func:`hardware_info`, read here when None)."""
    data: dict[str, Any] = {
        "created": datetime.now().isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "versions": _versions(),
        "git": _git(),
        "host": {"platform": platform.platform(), "cpu_count": _cpu_count()},
        "hardware": hardware if hardware is not None else hardware_info(),
        "errors": total_errors(configs),
        "configs": [
            {
                "label": c.label,
                "repo": c.repo,
                "repository_manifest": c.repository_manifest,
                "server": c.server,
                "warmup": [_record_json(r) for r in c.warmup],
                "levels": [_level_json(level) for level in c.levels],
            }
            for c in configs
        ],
    }
    if len(configs) == 2:
        data["comparison"] = comparison(configs[0], configs[1])
    return data


def _cpu_count() -> int:
    import psutil

    return psutil.cpu_count() or 1


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _triple(values: Sequence[float], spec: str, scale: float = 1.0) -> str:
    return " / ".join(fmt(v * scale, spec) for v in values)


def _config_section(config: ConfigResult) -> list[str]:
    server = config.server
    manifest = config.repository_manifest or {}
    overrides = f"; overrides {json.dumps(manifest['overrides'])}" if manifest.get("overrides") else ""
    out = [
        f"## {config.label}: {config.repo or server['grpc_url']}",
        "",
        f"Server {server['server_version']}, engine max batch {server['engine_max_batch_size']}, "
        f"tensorrt_llm queue delay {server['llm_queue_delay_us']} µs{overrides}; fixed-length input: "
        f"{server['fixed_length_input'] or 'none (outputs may end early)'}.",
        "",
        _row(
            "concurrency",
            "requests",
            "errors",
            "req/s",
            "output tok/s",
            "latency avg / P50 / P90 / P99 (s)",
            "TTFT avg / P50 / P99 (ms)",
            "ITL avg / P99 (ms)",
            "ended short",
        ),
        "|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for level in config.levels:
        st = level.stats
        out.append(
            _row(
                level.concurrency,
                st.requests,
                f"**{st.errors}**" if st.errors else 0,
                fmt(st.requests_per_s),
                fmt(st.output_tokens_per_s, ".1f"),
                _triple((st.latency_avg_s, st.latency_p50_s, st.latency_p90_s, st.latency_p99_s), ".3f"),
                _triple((st.ttft_avg_s, st.ttft_p50_s, st.ttft_p99_s), ".0f", 1e3),
                _triple((st.itl_avg_s, st.itl_p99_s), ".1f", 1e3),
                level.short_outputs,
            )
        )
    out += [
        "",
        _row(
            "concurrency",
            "utilization mean / max (%)",
            "source",
            "server CPU (% of all cores)",
            "client CPU (%)",
            "engine steps/s",
            "mean / max engine batch",
            "model-bandwidth util (%)",
        ),
        "|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for level in config.levels:
        u, e = level.utilization, level.engine
        out.append(
            _row(
                level.concurrency,
                f"{fmt(u.get('mean_pct'), '.1f')} / {fmt(u.get('max_pct'), '.1f')}",
                u.get("source"),
                fmt(u.get("server_cpu_mean_pct"), ".1f"),
                fmt(u.get("client_cpu_mean_pct"), ".1f"),
                fmt(e.get("steps_per_s"), ".1f"),
                f"{fmt(e.get('mean_batch'), '.2f')} / {fmt(e.get('max_batch_since_start'), '.0f')}",
                fmt(level.mbu_pct, ".3f"),
            )
        )
    out += [
        "",
        "Per-model server figures (Triton statistics API; times are per request; Triton batch sizes: "
        "executions per batch size):",
        "",
        _row("concurrency", "model", "requests", "queue (ms)", "compute infer (ms)", "request (ms)", "Triton batches"),
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for level in config.levels:
        for name, m in sorted(level.models.items()):
            failed = f" ({m['fail']} failed)" if m["fail"] else ""
            out.append(
                _row(
                    level.concurrency,
                    name,
                    f"{m['success']}{failed}",
                    fmt(m["queue_ms"], ".2f"),
                    fmt(m["compute_infer_ms"], ".2f"),
                    fmt(m["request_ms"], ".2f"),
                    ", ".join(f"{k}×{v}" for k, v in m["batch_sizes"].items()),
                )
            )
    out.append("")
    return out


def markdown_report(
    configs: Sequence[ConfigResult], settings: BenchSettings, hardware: dict[str, Any] | None = None
) -> str:
    """The report's tables as Markdown (``hardware``: :func:`hardware_info`, read here when None)."""
    hw = hardware if hardware is not None else hardware_info()
    errors = total_errors(configs)
    git = _git()
    out = ["# Benchmark report", ""]
    if errors:
        out += [
            f"**WARNING: {errors} REQUEST(S) FAILED. The figures below are not valid; see report.json "
            "(`error` of each request) and the server log.**",
            "",
        ]
    s = settings
    out += [
        f"Workload: concurrency {', '.join(map(str, s.concurrency))}; "
        f"{s.requests if s.requests is not None else 'unbounded'} requests"
        f"{f' or {s.duration_s:g} s' if s.duration_s is not None else ''} per level; "
        f"prompts {s.input_tokens} ± {s.input_spread:g} tokens; max_tokens {s.output_tokens}; "
        f"image share {s.image_share:g}, audio share {s.audio_share:g}; warm-up {s.warmup}; seed {s.seed}.",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in _versions().items() if v)}. "
        f"Git commit {git['commit']}{' (with uncommitted changes)' if git['dirty'] else ''}.",
        "",
        hardware_line(hw),
        "",
    ]
    if len(configs) == 2:
        out += ["## Before / after", ""]
        for block in comparison(configs[0], configs[1]):
            out += [comparison_table(block, configs[0].label, configs[1].label), ""]
        out += ["Change is (after - before) / before. Utilization: see the per-configuration notes below.", ""]
    for config in configs:
        out += _config_section(config)
    out += [
        "## How to read this",
        "",
        "- Latency: send to last token; TTFT: send to first token; ITL: gaps between consecutive tokens of a request, "
        "pooled over requests (tokens arriving in one response count as 0 gaps). Throughput is over the level's "
        "wall time (first send to last end). Percentiles: numpy, linear interpolation.",
        "- Utilization: `gpu` = mean of Triton's `nv_gpu_utilization` (share of time any kernel ran, not "
        "useful work); `server_cpu` = CPU seconds of the server process tree (tritonserver + python backend "
        "stubs) over the level's wall time × cores. The client's own CPU use is shown beside it: on a small "
        "machine it competes with the server.",
        "- Engine steps/s and mean batch come from `mmtriton_engine_steps_total` and "
        "`mmtriton_engine_step_sequences_total`; the max batch is a gauge since server start. Model-bandwidth "
        "utilization = weight bytes × engine steps/s / copy bandwidth (read + write).",
        "- For decoupled models (`tensorrt_llm`, the chat ensembles) Triton's compute time covers `execute()` only.",
        "- 'ended short': requests whose output is shorter than max_tokens (the model produced its end token). "
        "Outputs are forced to max_tokens only when the chat ensembles have a `min_tokens` or `ignore_eos` input "
        "(`fixed_length_input` in report.json).",
        "",
    ]
    return "\n".join(out)


def plot_report(configs: Sequence[ConfigResult], out_dir: Path) -> list[Path]:
    """Write ``throughput_latency.png`` and ``utilization.png`` (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    for config in configs:
        conc = [level.concurrency for level in config.levels]
        ax_tp.plot(conc, [level.stats.output_tokens_per_s for level in config.levels], "o-", label=config.label)
        ax_lat.plot(conc, [level.stats.latency_p99_s for level in config.levels], "o-", label=config.label)
    for ax, title, ylabel in (
        (ax_tp, "Throughput", "output tokens/s"),
        (ax_lat, "P99 latency", "seconds"),
    ):
        ax.set_xscale("log", base=2)
        ticks = sorted({level.concurrency for config in configs for level in config.levels})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    paths.append(out_dir / "throughput_latency.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(configs), 1, figsize=(11, 3.2 * len(configs)), squeeze=False, sharey=True)
    for ax, config in zip(axes[:, 0], configs, strict=True):
        source = next((lvl.utilization.get("source") for lvl in config.levels), "none")
        key = "gpu_util_pct" if source == "gpu" else "server_cpu_pct"
        for level in config.levels:
            points = [(s["t_s"], s[key]) for s in level.samples if s.get(key) is not None]
            client = [(s["t_s"], s["client_cpu_pct"]) for s in level.samples if s.get("client_cpu_pct") is not None]
            first = level is config.levels[0]
            if points:
                ax.plot(
                    *zip(*points, strict=True), "o-", ms=3, color="C0", label=f"server ({source})" if first else None
                )
            if client:
                ax.plot(*zip(*client, strict=True), "o:", ms=2, color="C1", label="client CPU" if first else None)
            mean = level.utilization.get("mean_pct")
            if mean is not None:
                ax.hlines(
                    mean,
                    level.start_s,
                    level.end_s,
                    colors="C0",
                    linestyles="--",
                    lw=1,
                    label="level mean" if first else None,
                )
            ax.axvspan(level.start_s, level.end_s, alpha=0.08, color="C2")
            ax.text(
                (level.start_s + level.end_s) / 2,
                1.0,
                f"c={level.concurrency}",
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_ylabel("utilization (%)")
        ax.set_title(f"{config.label}: utilization over time", pad=14)
        ax.set_ylim(0, 105)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the configuration's first request")
    fig.tight_layout()
    paths.append(out_dir / "utilization.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def report_dir(results_dir: Path, settings: BenchSettings, compare: bool) -> Path:
    """``results/<YYYYmmdd-HHMMSS>-<settings>/`` (created)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = results_dir / f"{stamp}-{'compare-' if compare else ''}{settings.slug()}"
    out.mkdir(parents=True, exist_ok=False)
    return out


def write_report(configs: Sequence[ConfigResult], settings: BenchSettings, out_dir: Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, the PNG plots and the server logs into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "report.json", "md": out_dir / "report.md"}
    hardware = hardware_info()
    paths["json"].write_text(json.dumps(report_dict(configs, settings, hardware), indent=1, default=str) + "\n")
    paths["md"].write_text(markdown_report(configs, settings, hardware))
    for path in plot_report(configs, out_dir):
        paths[path.stem] = path
    for config in configs:
        if config.server_log is not None:
            paths[f"log-{config.label}"] = out_dir / f"tritonserver-{config.label}.log"
            paths[f"log-{config.label}"].write_text(config.server_log)
    return paths
