"""Benchmark: statistics on synthetic timings with known answers, and a short real run.

The statistics are checked against hand-computed values (numpy's linear
interpolation for percentiles). The run against the session's CPU server is
tiny (2 at once, 6 requests, 8 output tokens) and asserts no timing: it must
finish without errors and its report's token counts must equal what the
server returned.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import bench
from bench.stats import (
    RequestTiming,
    duration,
    error_count,
    inter_token_latencies,
    latencies,
    output_tokens_per_s,
    percent_change,
    percentile,
    requests_per_s,
    summarize,
    ttfts,
)

# ---------------------------------------------------------------------------- statistics


@pytest.fixture
def timings() -> list[RequestTiming]:
    """Two successful requests and one failed one, with hand-checkable numbers."""
    return [
        # latency 2.5, TTFT 1.0, gaps 0.5 and 1.0
        RequestTiming(send_s=0.0, end_s=2.5, token_times_s=[1.0, 1.5, 2.5], output_tokens=3),
        # latency 2.0, TTFT 0.5; two tokens arrive in one response: gaps 0.0, 0.5, 1.0
        RequestTiming(send_s=1.0, end_s=3.0, token_times_s=[1.5, 1.5, 2.0, 3.0], output_tokens=4),
        # failed: counts in the duration and the error count only
        RequestTiming(send_s=0.5, end_s=4.0, token_times_s=[0.6], output_tokens=1, error="boom"),
    ]


def test_percentiles_use_linear_interpolation() -> None:
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([1, 2, 3, 4], 99) == pytest.approx(3.97)
    values = np.arange(1, 101, dtype=float)
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))


def test_latency_ttft_itl(timings: list[RequestTiming]) -> None:
    np.testing.assert_allclose(latencies(timings), [2.5, 2.0])
    np.testing.assert_allclose(ttfts(timings), [1.0, 0.5])
    np.testing.assert_allclose(inter_token_latencies(timings), [0.5, 1.0, 0.0, 0.5, 1.0])


def test_throughput_and_errors(timings: list[RequestTiming]) -> None:
    assert duration(timings) == pytest.approx(4.0)  # first send 0.0 to last end 4.0 (the failed one)
    assert requests_per_s(timings) == pytest.approx(2 / 4.0)
    assert output_tokens_per_s(timings) == pytest.approx(7 / 4.0)
    assert error_count(timings) == 1


def test_summary(timings: list[RequestTiming]) -> None:
    stats = summarize(timings)
    assert (stats.requests, stats.errors, stats.output_tokens) == (3, 1, 7)
    assert stats.latency_avg_s == pytest.approx(2.25)
    assert stats.latency_p50_s == pytest.approx(2.25)
    assert stats.latency_p90_s == pytest.approx(2.45)
    assert stats.latency_p99_s == pytest.approx(2.495)
    assert stats.ttft_avg_s == pytest.approx(0.75)
    assert stats.ttft_p50_s == pytest.approx(0.75)
    assert stats.ttft_p99_s == pytest.approx(0.995)
    assert stats.itl_avg_s == pytest.approx(0.6)
    assert stats.itl_p99_s == pytest.approx(1.0)
    assert stats.requests_per_s == pytest.approx(0.5)
    assert stats.output_tokens_per_s == pytest.approx(1.75)
    assert json.dumps(stats.to_dict())  # JSON-ready


def test_itl_is_pooled_over_tokens_not_averaged_per_request() -> None:
    many = RequestTiming(0.0, 2.0, [1.0 + 0.1 * i for i in range(11)], 11)  # ten gaps of 0.1
    few = RequestTiming(0.0, 3.0, [2.0, 3.0], 2)  # one gap of 1.0
    assert summarize([many, few]).itl_avg_s == pytest.approx((10 * 0.1 + 1.0) / 11)


def test_empty_and_degenerate_runs() -> None:
    stats = summarize([])
    assert (stats.requests, stats.errors, stats.duration_s) == (0, 0, 0.0)
    assert math.isnan(stats.latency_avg_s) and math.isnan(stats.requests_per_s)
    assert stats.to_dict()["latency_p99_s"] is None
    one_token = summarize([RequestTiming(0.0, 1.0, [0.5], 1)])
    assert one_token.ttft_avg_s == pytest.approx(0.5)
    assert math.isnan(one_token.itl_avg_s)  # no gap in a one-token answer
    all_failed = summarize([RequestTiming(0.0, 1.0, [], 0, error="x")])
    assert all_failed.errors == 1 and all_failed.requests_per_s == 0.0


def test_token_times_out_of_order_are_rejected() -> None:
    with pytest.raises(ValueError, match="not in order"):
        inter_token_latencies([RequestTiming(0.0, 1.0, [0.5, 0.4], 2)])


def test_percent_change() -> None:
    assert percent_change(100.0, 150.0) == pytest.approx(50.0)
    assert percent_change(2.0, 1.0) == pytest.approx(-50.0)
    assert math.isnan(percent_change(0.0, 1.0))
    assert math.isnan(percent_change(None, 1.0))


# ---------------------------------------------------------------------------- server-side helpers


def test_parse_metrics_and_engine_delta() -> None:
    text = (
        "# HELP mmtriton_engine_steps_total x\n"
        '# TYPE mmtriton_engine_steps_total counter\nmmtriton_engine_steps_total{model="tensorrt_llm"} 10\n'
        'mmtriton_engine_step_sequences_total{model="tensorrt_llm"} 25\n'
        'mmtriton_engine_step_batch_size_max{model="tensorrt_llm"} 4\n'
        'nv_gpu_utilization{gpu_uuid="a"} 0.5\nnv_gpu_utilization{gpu_uuid="b"} 0.7\n'
    )
    after = bench.parse_metrics(text)
    assert bench.metric_values(after, "nv_gpu_utilization") == [0.5, 0.7]
    before = {
        'mmtriton_engine_steps_total{model="tensorrt_llm"}': 4.0,
        'mmtriton_engine_step_sequences_total{model="tensorrt_llm"}': 7.0,
    }
    delta = bench.engine_delta(before, after, duration_s=2.0)
    assert (delta["steps"], delta["sequences"]) == (6, 18)
    assert delta["mean_batch"] == pytest.approx(3.0)
    assert delta["steps_per_s"] == pytest.approx(3.0)
    assert delta["max_batch_since_start"] == 4
    assert bench.engine_delta({}, {}, 1.0) == {"available": False}


def test_model_stats_delta() -> None:
    def snap(success: int, queue_ns: int, infer_ns: int, executions: int, batch: dict[int, int]) -> dict:
        zero = {"count": 0, "ns": 0}
        return {
            "inference_count": success,
            "execution_count": executions,
            "batch": batch,
            "success": {"count": success, "ns": 10 * queue_ns},
            "fail": zero,
            "queue": {"count": success, "ns": queue_ns},
            "compute_input": zero,
            "compute_infer": {"count": success, "ns": infer_ns},
            "compute_output": zero,
        }

    before = {"m": snap(2, 2_000_000, 4_000_000, 2, {1: 2}), "idle": snap(1, 1, 1, 1, {1: 1})}
    after = {"m": snap(6, 6_000_000, 16_000_000, 4, {1: 3, 2: 1, 3: 0}), "idle": snap(1, 1, 1, 1, {1: 1})}
    delta = bench.model_stats_delta(before, after)
    assert set(delta) == {"m"}  # a model that did nothing is left out
    m = delta["m"]
    assert (m["success"], m["executions"], m["mean_batch"]) == (4, 2, 2.0)
    assert m["queue_ms"] == pytest.approx(1.0)  # 4 ms over 4 requests
    assert m["compute_infer_ms"] == pytest.approx(3.0)  # 12 ms over 4 requests
    assert m["batch_sizes"] == {1: 1, 2: 1}


# ---------------------------------------------------------------------------- workload


def test_synthetic_prompts_have_about_the_target_length(bundle_dir: Path) -> None:
    tokenizer = bench.load_tokenizer(bundle_dir / "llm")
    settings = bench.BenchSettings(input_tokens=80, input_spread=0.0, image_share=0.5, audio_share=0.5, seed=7)
    workload = bench.Workload(tokenizer, settings, max_prompt_tokens=1000, media_pool=2)
    requests = [workload.request(i) for i in range(12)]
    for req in requests:
        assert abs(req.prompt_tokens - 80) <= 2, req.prompt_tokens
    assert len({r.prompt for r in requests}) == len(requests)  # every prompt differs
    again = bench.Workload(tokenizer, settings, max_prompt_tokens=1000, media_pool=2)
    assert [again.request(i).prompt for i in range(12)] == [r.prompt for r in requests]  # deterministic
    assert len({r.model for r in requests}) > 1  # media and text-only requests mixed
    capped = bench.Workload(tokenizer, settings, max_prompt_tokens=20, media_pool=1).request(0)
    assert capped.prompt_tokens <= 22


def _level(concurrency: int, error: str | None) -> bench.LevelResult:
    records = [
        bench.RequestRecord(0, "chat_text", "r0", 10, 0, 0, 4, 0.0, 1.0, [0.4, 0.6, 0.8, 1.0], 4, 20, 4),
        bench.RequestRecord(1, "chat_image", "r1", 10, 900, 0, 4, 0.5, 1.5, [], 0, None, None, error),
    ]
    return bench.LevelResult(
        concurrency=concurrency,
        stats=summarize([r.timing() for r in records]),
        records=records,
        start_s=0.0,
        end_s=1.5,
        models={},
        engine={"available": False},
        utilization={"source": "server_cpu", "mean_pct": 50.0, "max_pct": 60.0},
        samples=[{"t_s": 0.5, "server_cpu_pct": 50.0, "client_cpu_pct": 5.0, "gpu_util_pct": None}],
        short_outputs=0,
        token_count_mismatches=0,
        mbu_pct=None,
    )


def _config(label: str, error: str | None) -> bench.ConfigResult:
    server = {"grpc_url": "x", "server_version": "2.51.0", "engine_max_batch_size": 8, "llm_queue_delay_us": 100,
              "fixed_length_input": "ignore_eos"}  # fmt: skip
    return bench.ConfigResult(label, None, None, server, [], [_level(1, error), _level(4, None)])


def test_report_flags_failed_requests_and_compares(tmp_path: Path) -> None:
    from bench import report as bench_report

    settings = bench.BenchSettings(concurrency=[1, 4], requests=2)
    configs = [_config("before", "RuntimeError: boom"), _config("after", None)]
    paths = bench_report.write_report(configs, settings, tmp_path)
    markdown = paths["md"].read_text()
    assert "WARNING: 1 REQUEST(S) FAILED" in markdown
    assert "| concurrency 1 | before | after | change |" in markdown
    report = json.loads(paths["json"].read_text())
    assert report["errors"] == 1
    rows = {row["metric"]: row for row in report["comparison"][0]["rows"]}
    # before: 1 of 2 requests succeeded over 1.5 s; after: 2 of 2 (second one now a success with 0 tokens)
    assert rows["QPS (requests/s)"]["before"] == pytest.approx(1 / 1.5)
    assert rows["QPS (requests/s)"]["change_pct"] == pytest.approx(100.0)
    assert rows["utilization (%)"]["change_pct"] == pytest.approx(0.0)
    for name in ("throughput_latency", "utilization"):
        assert paths[name].stat().st_size > 0
    # The hardware it ran on, in both files.
    hw = report["hardware"]
    assert hw["cpu_model"] == _proc_cpu_model() and hw["cpu_cores"] == os.cpu_count()
    assert f"CPU {hw['cpu_model']}, {os.cpu_count()} cores" in markdown


def _proc_cpu_model() -> str:
    """The first ``model name`` of /proc/cpuinfo, read here independently of the benchmark's code."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    raise AssertionError("no model name in /proc/cpuinfo")


def test_hardware_block_names_this_machine() -> None:
    from bench import report as bench_report

    hw = bench_report.hardware_info()
    assert hw["cpu_model"] == _proc_cpu_model()
    assert hw["cpu_cores"] == os.cpu_count()
    smi = shutil.which("nvidia-smi")
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout if smi else ""
    gpus = [line for line in listed.splitlines() if line.startswith("GPU ")]
    assert hw["gpu_count"] == len(gpus)
    if not gpus:
        assert hw["gpu_model"] is None and hw["driver_version"] is None and hw["cuda_version"] is None
        expected = f"Hardware: no GPU; CPU {_proc_cpu_model()}, {os.cpu_count()} cores ({platform.machine()})."
        assert bench_report.hardware_line(hw) == expected


def test_hardware_block_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nvidia-smi with known answers: two GPUs, their driver, the CUDA version of its banner."""
    from bench import report as bench_report

    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--query-gpu=name,memory.total,driver_version" ]; then\n'
        '  printf "NVIDIA H100 80GB HBM3, 81559, 550.54.15\\nNVIDIA H100 80GB HBM3, 81559, 550.54.15\\n"; exit 0\n'
        "fi\n"
        'echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    hw = bench_report.hardware_info()
    assert (hw["gpu_model"], hw["gpu_count"], hw["gpu_source"]) == ("NVIDIA H100 80GB HBM3", 2, "nvidia-smi")
    assert (hw["driver_version"], hw["cuda_version"]) == ("550.54.15", "12.4")
    assert hw["gpus"][1] == {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "driver_version": "550.54.15"}
    assert bench_report.hardware_line(hw).startswith(
        "Hardware: 2 × NVIDIA H100 80GB HBM3 (driver 550.54.15, CUDA 12.4; from nvidia-smi); CPU "
    )


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["--compare", "before", "after"], "--compare needs --start-cpu-server"),
        (["--start-cpu-server"], "--start-cpu-server needs --repo or --compare"),
    ],
)
def test_cli_refuses_what_it_cannot_run(
    argv: list[str], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused as a usage error (argparse's exit code 2, with the reason), before anything runs or is written."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*argv, "--results-dir", str(tmp_path / "results")])
    assert exit_info.value.code == 2
    assert f"error: {reason}" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------------------- real server


def test_short_run_against_cpu_server(server, grpc_url: str, tmp_path: Path) -> None:  # noqa: ANN001
    assert server.process is not None
    code = bench.main(
        [
            "--url",
            grpc_url,
            "--metrics-url",
            server.metrics_url,
            "--server-pid",
            str(server.process.pid),
            "--concurrency",
            "2",
            "--requests",
            "6",
            "--input-tokens",
            "48",
            "--input-spread",
            "8",
            "--output-tokens",
            "8",
            "--image-share",
            "0.5",
            "--audio-share",
            "0.5",
            "--warmup",
            "1",
            "--seed",
            "3",
            "--copy-bandwidth-gbs",
            "10",
            "--results-dir",
            str(tmp_path),
        ]
    )
    assert code == 0
    (out_dir,) = tmp_path.iterdir()
    assert out_dir.name.endswith("-c2-in48-out8-img50-aud50-n6")
    for name in ("report.json", "report.md", "throughput_latency.png", "utilization.png"):
        assert (out_dir / name).stat().st_size > 0, name
    report = json.loads((out_dir / "report.json").read_text())
    assert report["errors"] == 0
    assert report["settings"]["output_tokens"] == 8
    assert report["versions"]["tritonclient"] and report["git"]["commit"]
    assert (report["hardware"]["cpu_model"], report["hardware"]["cpu_cores"]) == (_proc_cpu_model(), os.cpu_count())
    (config,) = report["configs"]
    assert config["warmup"] and all(r["error"] is None for r in config["warmup"])
    (level,) = config["levels"]
    requests = level["requests"]
    assert len(requests) == 6 and [r["index"] for r in requests] == list(range(6))
    assert len({r["model"] for r in requests}) > 1  # text-only and media requests mixed
    for req in requests:
        assert req["error"] is None
        # What the client counted is what the server said it generated.
        assert req["output_tokens"] == req["server_output_tokens"] == len(req["token_times_s"])
        assert 1 <= req["output_tokens"] <= 8
        assert req["server_input_tokens"] >= req["prompt_tokens"]
        assert req["send_s"] <= req["token_times_s"][0] <= req["token_times_s"][-1] <= req["end_s"]
    stats = level["stats"]
    assert (stats["requests"], stats["errors"]) == (6, 0)
    assert stats["output_tokens"] == sum(r["output_tokens"] for r in requests)
    assert level["token_count_mismatches"] == 0
    assert level["short_outputs"] == sum(1 for r in requests if r["output_tokens"] < 8)
    if config["server"]["fixed_length_input"]:  # the ensembles can force the length: it must hold
        assert level["short_outputs"] == 0
    # Server-side figures came from Triton: the engine stepped, the models were counted.
    assert level["engine"]["available"] and level["engine"]["steps"] > 0
    assert level["models"]["tensorrt_llm"]["success"] >= 6
    for model in {r["model"] for r in requests}:
        assert level["models"][model]["success"] >= 1
    assert level["utilization"]["source"] == "server_cpu"
    assert level["utilization"]["mean_pct"] is not None
    assert level["model_bandwidth_utilization_pct"] is not None
    markdown = (out_dir / "report.md").read_text()
    assert "| 2 | 6 | 0 |" in markdown and "WARNING" not in markdown
