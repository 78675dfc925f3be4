"""Server orchestration: start ``tritonserver`` on a rendered CPU repository per configuration, run, stop."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from bench import ROOT
from bench.load import Progress
from bench.run import ConfigResult, run_config
from bench.triton_stats import ServerTarget
from bench.workload import BenchSettings

LOGGER = logging.getLogger(__name__)


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
    from mmtriton.serving.server import TritonServer

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
