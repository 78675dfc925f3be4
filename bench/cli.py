"""Load generator and benchmark report for the chat ensembles (gRPC streaming).

``python -m bench`` sends a synthetic workload to a running server (or to
one it starts on a rendered CPU repository), at one or several concurrency
levels, and writes a report: every raw per-request figure as JSON, Markdown
tables and PNG plots, under ``results/<YYYYmmdd-HHMMSS>-<settings>/``.

Examples::

    # against a running server (make serve)
    python -m bench --url localhost:8001 --concurrency 1,4,16 --requests 32 --output-tokens 32

    # start a CPU server on a repository, run, stop it
    python -m bench --start-cpu-server --repo build/repo-cpu-tiny-mm --concurrency 4 --duration 30

    # before/after: the same workload against two repositories, one server at a time
    python -m bench --start-cpu-server --compare build/repo-cpu-tiny-mm-bs1 build/repo-cpu-tiny-mm \\
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
import logging
import sys
from pathlib import Path

from bench import ROOT
from bench.report import comparison, comparison_table, report_dir, total_errors, write_report
from bench.run import ConfigResult, run_config
from bench.servers import run_with_cpu_server
from bench.stats import fmt
from bench.triton_stats import ServerTarget
from bench.workload import BenchSettings, workload_settings

LOGGER = logging.getLogger(__name__)


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
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
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
    load.add_argument("--audio-seconds", type=float, help="length of every audio clip (default: a 2-4 s mix)")
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

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.compare and not args.start_cpu_server:
        parser.error("--compare needs --start-cpu-server (it starts one server per repository)")
    if args.start_cpu_server and not (args.repo or args.compare):
        parser.error("--start-cpu-server needs --repo or --compare")
    settings = BenchSettings(
        concurrency=args.concurrency,
        requests=args.requests if args.requests is not None or args.duration is not None else 32,
        duration_s=args.duration,
        warmup=args.warmup,
        timeout_s=args.timeout,
        **workload_settings(args),
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
                f"utilization {fmt(level.utilization.get('mean_pct'), '.1f')}% ({level.utilization.get('source')})"
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
