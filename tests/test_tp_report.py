"""tools/tp_measure.sh and bench.tp_report without a GPU: report joins, ratios, per-GPU MBU, sampling, placement.

The TP=1 side is the one-GPU H200 run in docs/measurements (files as bench and
bench.vllm_inprocess wrote them); the TP=2 side is made here the way those modules make
theirs (bench.report.report_dict on real dataclasses, RunStats.to_dict for the anchor).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import tp_report
from bench.report import report_dict
from bench.run import ConfigResult, LevelResult
from bench.stats import RequestTiming, summarize
from bench.triton_stats import ServerTarget
from bench.utilization import summarize_gpus
from bench.workload import BenchSettings

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "tp_measure.sh"
TP1_RUN = ROOT / "docs" / "measurements" / "h200-2026-12-02-vllm-served"
UUIDS = ("GPU-aaaa-0000", "GPU-bbbb-1111")
HARDWARE = {"gpu_model": "NVIDIA H200", "gpu_count": 2, "gpus": [], "driver_version": "580", "cuda_version": "13.0",
            "gpu_source": "test", "cpu_model": "x", "cpu_cores": 32, "machine": "x86_64"}


def tp1_side(folder: Path) -> None:
    """The one-GPU run's files laid out as tools/tp_measure.sh names them."""
    shutil.copy(TP1_RUN / "inprocess.json", folder / "inprocess-tp1.json")
    for src, dest in (("served-c1", "served-tp1-c1"), ("served", "served-tp1")):
        (folder / dest / "20261202-000000-x").mkdir(parents=True)
        shutil.copy(TP1_RUN / src / "report.json", folder / dest / "20261202-000000-x" / "report.json")


def bandwidth(folder: Path, two_gpus: bool) -> dict:
    one = json.loads((TP1_RUN / "bandwidth.json").read_text())
    data = dict(one)
    if two_gpus:
        data["gpus"] = [
            {"index": 0, "name": "NVIDIA H200", "uuid": UUIDS[0], "copy_bandwidth_gbs": 4277.0},
            {"index": 1, "name": "NVIDIA H200", "uuid": UUIDS[1], "copy_bandwidth_gbs": 4000.0},
        ]
    (folder / "bandwidth.json").write_text(json.dumps(data))
    return data


def timings(n: int, tokens: int, itl_s: float, ttft_s: float, concurrency: int) -> list[RequestTiming]:
    """Closed-loop-looking timings: ``concurrency`` streams, each request after the previous one."""
    out = []
    for i in range(n):
        send = (i // concurrency) * (ttft_s + itl_s * tokens)
        times = [send + ttft_s + k * itl_s for k in range(tokens)]
        out.append(RequestTiming(send_s=send, end_s=times[-1], token_times_s=times, output_tokens=tokens))
    return out


def served_tp2(folder: Path, name: str, levels: dict[int, tuple[float, float]], steps_per_s: float) -> dict:
    """A bench report.json of TP=2 levels ``{c: (itl_s, ttft_s)}``, written as bench writes it."""
    results = []
    for c, (itl, ttft) in levels.items():
        stats = summarize(timings(4 * c, 32, itl, ttft, c))
        gpus = {UUIDS[0]: {"util_pct": 80.0, "memory_used_bytes": 120e9, "memory_total_bytes": 150e9},
                UUIDS[1]: {"util_pct": 60.0, "memory_used_bytes": 110e9, "memory_total_bytes": 150e9}}
        samples = [{"t_s": 0.5, "gpu_util_pct": 70.0, "server_cpu_pct": None, "client_cpu_pct": 1.0, "in_flight": c,
                    "gpus": gpus}]
        results.append(LevelResult(
            concurrency=c, stats=stats, records=[], start_s=0.0, end_s=stats.duration_s, models={},
            engine={"available": True, "steps_per_s": steps_per_s, "mean_batch": float(c)},
            utilization={"source": "gpu", "mean_pct": 70.0, "max_pct": 80.0, "gpus": summarize_gpus(samples)},
            samples=samples, short_outputs=0, token_count_mismatches=0, mbu_pct=None,
        ))
    config = ConfigResult(label="run", repo=None, repository_manifest=None, server={}, warmup=[], levels=results)
    settings = BenchSettings(concurrency=sorted(levels), requests=4, output_tokens=32)
    data = report_dict([config], settings, HARDWARE)
    out = folder / name / "20261203-000000-x"
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps(data, default=str))
    return data


def inprocess_tp2(folder: Path, levels: dict[int, tuple[float, float]]) -> dict:
    """An inprocess-tp2.json as bench.vllm_inprocess writes it."""
    rows = [{"concurrency": c, "media_rows": 0, **summarize(timings(4 * c, 32, itl, ttft, c)).to_dict()}
            for c, (itl, ttft) in levels.items()]
    data = {"engine": "vLLM AsyncLLM in-process", "vllm": "0.26.0", "engine_args": {"tensor_parallel_size": 2},
            "workload": {}, "levels": rows}
    (folder / "inprocess-tp2.json").write_text(json.dumps(data))
    return data


def test_per_gpu_mbu_formula() -> None:
    # 18.8 GB over two ranks: each GPU reads 9.4 GB per step; 100 steps/s against 4000 GB/s.
    assert tp_report.mbu_per_gpu_pct(18.8e9, 2, 100.0, 4000.0) == pytest.approx(100 * 9.4e9 * 100 / 4000e9)
    assert tp_report.mbu_per_gpu_pct(18.8e9, 1, 100.0, 4000.0) == pytest.approx(47.0)


def test_tp2_missing_is_reported_as_not_run(tmp_path: Path) -> None:
    tp1_side(tmp_path)
    bw = bandwidth(tmp_path, two_gpus=False)
    why = "served-tp2 skipped: tensor_parallel_size 2 needs 2 GPUs, 1 visible"
    (tmp_path / "skipped-served-tp2.txt").write_text(why + "\n")
    report = tp_report.write(tmp_path)

    assert report["not_run"] == [
        "served-tp2 skipped: tensor_parallel_size 2 needs 2 GPUs, 1 visible",
        f"inprocess-tp2: no results in {tmp_path.name}/ (step not run)",
    ]
    md = (tmp_path / "tp-report.md").read_text()
    assert "**Not run:**" in md and "needs 2 GPUs, 1 visible" in md
    assert (tmp_path / "tp-report.png").stat().st_size > 0
    assert json.loads((tmp_path / "tp-report.json").read_text())["not_run"] == report["not_run"]
    assert report["itl_c1"] is None
    served = json.loads((TP1_RUN / "served" / "report.json").read_text())["configs"][0]["levels"]
    for row in report["levels"]:
        assert row["served"]["2"] is None and row["served_tp2_over_tp1"] is None
        assert row["target_served_tp2_ok"] is None
    for level in served:
        row = next(r for r in report["levels"] if r["concurrency"] == level["concurrency"])
        tp1 = row["served"]["1"]
        assert tp1["tok_s"] == level["stats"]["output_tokens_per_s"]
        # At TP=1 the per-GPU MBU is bench's own MBU: all weights per step on GPU 0.
        expected = 100 * bw["weight_bytes"] * level["engine"]["steps_per_s"] / (bw["copy_bandwidth_gbs"] * 1e9)
        assert tp1["gpus"][0]["mbu_pct"] == pytest.approx(expected)
        assert tp1["gpus"][0]["mbu_pct"] == pytest.approx(level["model_bandwidth_utilization_pct"])


def test_tp2_ratios_targets_and_per_gpu_figures(tmp_path: Path) -> None:
    tp1_side(tmp_path)
    bw = bandwidth(tmp_path, two_gpus=True)
    # TP=2 c=1 decodes faster than TP=1's 5.78 ms; at c=16 the served side is 0.8x in-process, at c=32 0.95x.
    served_tp2(tmp_path, "served-tp2-c1", {1: (0.004, 0.05)}, steps_per_s=240.0)
    served_tp2(tmp_path, "served-tp2", {16: (0.005, 0.2), 32: (0.0056, 0.2)}, steps_per_s=180.0)
    anchor = inprocess_tp2(tmp_path, {1: (0.0039, 0.04), 16: (0.004, 0.16), 32: (0.0053, 0.19)})
    report = tp_report.build(tmp_path)

    assert [r["concurrency"] for r in report["levels"]] == [1, 16, 32, 64]
    assert report["not_run"] == []
    tp1_served = {lv["concurrency"]: lv["stats"] for name in ("served-c1", "served")
                  for lv in json.loads((TP1_RUN / name / "report.json").read_text())["configs"][0]["levels"]}
    tp1_anchor = {lv["concurrency"]: lv for lv in json.loads((TP1_RUN / "inprocess.json").read_text())["levels"]}
    tp2_anchor = {lv["concurrency"]: lv for lv in anchor["levels"]}
    for row in report["levels"]:
        c = row["concurrency"]
        if c == 64:
            assert row["served"]["2"] is None and row["served_tp2_over_tp1"] is None
            continue
        ttft, itl = {1: (0.05, 0.004), 16: (0.2, 0.005), 32: (0.2, 0.0056)}[c]
        # Independently: c streams, 4 rounds of 32 tokens; the last round starts at 3 x (ttft + 32 itl)
        # and its last token comes ttft + 31 itl later.
        tok_s = 4 * c * 32 / (3 * (ttft + 32 * itl) + ttft + 31 * itl)
        assert row["served"]["2"]["tok_s"] == pytest.approx(tok_s)
        ratios = row["served_tp2_over_tp1"]
        assert ratios["tok_s"] == pytest.approx(tok_s / tp1_served[c]["output_tokens_per_s"])
        assert ratios["itl_ms"] == pytest.approx(itl / tp1_served[c]["itl_avg_s"])
        assert ratios["ttft_ms"] == pytest.approx(ttft / tp1_served[c]["ttft_avg_s"])
        assert ratios["p99_s"] == pytest.approx(row["served"]["2"]["p99_s"] / tp1_served[c]["latency_p99_s"])
        assert row["inprocess_tp2_over_tp1"]["tok_s"] == pytest.approx(
            tp2_anchor[c]["output_tokens_per_s"] / tp1_anchor[c]["output_tokens_per_s"])
        versus = row["served_over_inprocess"]["2"]["tok_s"]
        assert versus == pytest.approx(tok_s / tp2_anchor[c]["output_tokens_per_s"])
        assert row["target_served_tp2_ok"] == (None if c < 16 else versus >= 0.9)
        # Per GPU: each rank reads half the weights per step, against its own bandwidth.
        steps = 240.0 if c == 1 else 180.0
        gpus = {g["gpu"]: g for g in row["served"]["2"]["gpus"]}
        assert set(gpus) == {0, 1}
        for index, gbs in ((0, 4277.0), (1, 4000.0)):
            assert gpus[index]["mbu_pct"] == pytest.approx(100 * bw["weight_bytes"] / 2 * steps / (gbs * 1e9))
        assert gpus[0]["util_mean_pct"] == 80.0 and gpus[1]["util_mean_pct"] == 60.0
        assert gpus[1]["memory_used_max_bytes"] == 110e9
    assert [r["target_served_tp2_ok"] for r in report["levels"]] == [None, False, True, None]
    assert report["itl_c1"]["ok"] is True
    assert report["itl_c1"]["tp1_ms"] == pytest.approx(tp1_served[1]["itl_avg_s"] * 1e3)
    md = tp_report.markdown(report)
    assert "**Not run:**" not in md and "(target: TP=2 below TP=1): **yes**" in md
    tp_report.plot(report, tmp_path / "plot.png")


class _Metrics(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 - the http.server name
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def metrics_url() -> Iterator[str]:
    _Metrics.body = "".join(
        f'nv_gpu_utilization{{gpu_uuid="{u}"}} {util}\nnv_gpu_memory_used_bytes{{gpu_uuid="{u}"}} {used}\n'
        f'nv_gpu_memory_total_bytes{{gpu_uuid="{u}"}} 1.5e+11\n'
        for u, util, used in ((UUIDS[0], 0.9, 1.2e11), (UUIDS[1], 0.4, 1.0e11))
    ).encode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    server.shutdown()
    server.server_close()


def test_the_benchmark_sampler_reads_each_gpu(metrics_url: str) -> None:
    import time

    from bench.utilization import UtilizationSampler

    sampler = UtilizationSampler(ServerTarget("localhost:1", metrics_url), time.perf_counter(), period_s=0.05)
    sampler.start()
    time.sleep(0.3)
    summary = sampler.stop()
    assert summary["source"] == "gpu" and summary["mean_pct"] == pytest.approx(65.0)
    gpus = summary["gpus"]
    assert set(gpus) == set(UUIDS)
    assert gpus[UUIDS[0]]["util_mean_pct"] == pytest.approx(90.0)
    assert gpus[UUIDS[1]]["util_max_pct"] == pytest.approx(40.0)
    assert gpus[UUIDS[1]]["memory_used_max_bytes"] == 1.0e11
    assert gpus[UUIDS[0]]["memory_total_bytes"] == 1.5e11
    assert all(s["gpus"][UUIDS[0]]["util_pct"] == pytest.approx(90.0) for s in sampler.samples)


def test_placement_reports_preprocessing_and_encoders_on_gpu0(bundle_dir: Path, tmp_path: Path) -> None:
    from build_engines.render import render_repository

    repo = render_repository(bundle_dir, tmp_path / "repo", "gpu-vllm", overrides={"serving.tensor_parallel_size": "2"})
    gpu_models = ("audio_encoder", "audio_preprocess", "image_preprocess", "vision_encoder")
    after = tp_report.placement(repo)  # the render pins them (build_engines/render.py)
    assert after["tensor_parallel_size"] == 2
    for m in gpu_models:
        assert after["models"][m]["groups"] == [{"kind": "KIND_GPU", "count": 1, "gpus": [0]}]
    assert after["models"]["vision_encoder"]["device"] == "cuda:0"
    assert after["models"]["image_preprocess"]["device"] == "device_id 0"
    assert after["models"]["tensorrt_llm"]["groups"][0]["kind"] == "KIND_CPU"


def test_script_exports_nvlink_multicast_off_first() -> None:
    lines = SCRIPT.read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    exported = dict(re.findall(r"(\w+)=(\S+)", lines[first].removeprefix("export ")))
    assert lines[first].startswith("export ") and exported == tp_report.NVLINK_MULTICAST_OFF


def test_script_passes_the_variables_to_every_process_and_skips_tp2_without_gpus(tmp_path: Path) -> None:
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nenv > "$STUB_ENV_DIR/env.$$"\necho "$@" >> "$STUB_ENV_DIR/argv"\n')
    stub.chmod(0o755)
    (tmp_path / "envs").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(PYTHON=str(stub), WORK=str(tmp_path / "work"), STUB_ENV_DIR=str(tmp_path / "envs"),
               NCCL_NVLS_ENABLE="1", TORCH_SYMM_MEM_DISABLE_MULTICAST="0")
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "bundle", "inprocess-tp2", "served-tp2"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = [dict(line.split("=", 1) for line in p.read_text().splitlines() if "=" in line)
            for p in sorted((tmp_path / "envs").glob("env.*"))]
    assert len(seen) >= 3  # bundle, and the GPU count of each TP=2 step
    for child in seen:
        for key, value in tp_report.NVLINK_MULTICAST_OFF.items():
            assert child[key] == value
    for step in ("inprocess-tp2", "served-tp2"):
        why = (out / f"skipped-{step}.txt").read_text().strip()
        assert why == f"{step} skipped: tensor_parallel_size 2 needs 2 GPUs, 0 visible"
        assert why in done.stderr
    argv = (tmp_path / "envs" / "argv").read_text()
    assert "build_engines bundle" in argv and "mmtriton.serving.server" not in argv and "vllm_inprocess" not in argv
