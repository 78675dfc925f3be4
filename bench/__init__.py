"""Benchmark of the chat ensembles: load generator, server-side figures and reports.

``python -m bench`` runs it (see :mod:`bench.cli`). Modules, one job each:

* :mod:`bench.workload`: run settings and the deterministic synthetic requests.
* :mod:`bench.triton_stats`: model configs and the statistics API over gRPC, Prometheus parsing.
* :mod:`bench.utilization`: utilization sampling, host copy bandwidth, weight size.
* :mod:`bench.load`: the closed-loop client (one gRPC stream per worker).
* :mod:`bench.run`: one configuration (warm-up, then every concurrency level).
* :mod:`bench.servers`: starting a CPU server per configuration.
* :mod:`bench.stats`: statistics over request timings (pure functions).
* :mod:`bench.report`: ``report.json``, ``report.md`` and the plots.
* :mod:`bench.cli`: the command line (``python -m bench``).
* :mod:`bench.summary`, :mod:`bench.decode`, :mod:`bench.preprocess`: separate tools
  (``python -m bench.summary`` etc.).

The package namespace also gives the main names of those modules (``bench.Workload``,
``bench.run_config``, ``bench.main``, ...), imported on first use so that importing one
module does not import them all.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_EXPORTS: dict[str, str] = {
    "BenchSettings": "bench.workload",
    "PlannedRequest": "bench.workload",
    "Workload": "bench.workload",
    "load_tokenizer": "bench.workload",
    "FIXED_LENGTH_INPUTS": "bench.triton_stats",
    "ServerInfo": "bench.triton_stats",
    "ServerTarget": "bench.triton_stats",
    "engine_delta": "bench.triton_stats",
    "metric_sum": "bench.triton_stats",
    "metric_values": "bench.triton_stats",
    "model_stats": "bench.triton_stats",
    "model_stats_delta": "bench.triton_stats",
    "parse_metrics": "bench.triton_stats",
    "scrape_metrics": "bench.triton_stats",
    "server_info": "bench.triton_stats",
    "UtilizationSampler": "bench.utilization",
    "host_copy_bandwidth_gbs": "bench.utilization",
    "weight_bytes": "bench.utilization",
    "Progress": "bench.load",
    "RequestRecord": "bench.load",
    "run_requests": "bench.load",
    "ConfigResult": "bench.run",
    "LevelResult": "bench.run",
    "run_config": "bench.run",
    "run_level": "bench.run",
    "run_with_cpu_server": "bench.servers",
    "main": "bench.cli",
}

__all__ = ["ROOT", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use and return it (PEP 562).

    Raises:
        AttributeError: ``name`` is not one of the package's names.
    """
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    """The package's names, the lazily imported ones included."""
    return sorted({*globals(), *_EXPORTS})
