"""One bounded NVIDIA ``aiperf`` run against the OpenAI front door, with base64 images.

``aiperf`` (PyPI) pins numpy 2, protobuf 7 and prometheus-client 0.23, which clash with
this project's pins, so it lives in a virtualenv of its own (``build/aiperf-venv``, made by
``make aiperf-setup`` from ``requirements-aiperf.txt``); ``MMTRITON_AIPERF`` may name another
binary. Without it the test is skipped with that instruction, and fails under ``make test``
(``MMTRITON_REQUIRE_AIPERF``), which installs it first.

The run: 2 warm-up + 8 requests at concurrency 4, each a synthetic prompt of about 32
tokens with one 320x240 JPEG as a ``data:image/jpeg;base64`` URL, 8 output tokens with
``ignore_eos``; aiperf reads the token counts from the front door's ``usage``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bench.triton_stats import metric_sum, scrape_metrics
from mmtriton.serving.server import TritonServer
from tests.conftest import BUILD
from tests.helpers.frontdoor import FrontDoor

REQUESTS, WARMUP, CONCURRENCY, OUTPUT_TOKENS = 8, 2, 4, 8
AIPERF_TIMEOUT_S = 300


def _aiperf() -> str | None:
    named = os.environ.get("MMTRITON_AIPERF")
    if named:
        return named
    local = BUILD / "aiperf-venv" / "bin" / "aiperf"
    return str(local) if local.exists() else shutil.which("aiperf")


def test_aiperf_against_the_front_door_with_images(
    grpc_url: str, bundle_dir: Path, server: TritonServer, tmp_path: Path
) -> None:
    aiperf = _aiperf()
    if aiperf is None:
        message = "aiperf is not installed: make aiperf-setup (build/aiperf-venv, requirements-aiperf.txt)"
        if os.environ.get("MMTRITON_REQUIRE_AIPERF"):
            pytest.fail(message)  # make test (and CI) installs it first: missing means broken setup
        pytest.skip(message)
    door = FrontDoor(grpc_url, bundle_dir, tmp_path / "door")
    tokens_before = metric_sum(scrape_metrics(server.metrics_url), "mmtriton_engine_step_sequences_total") or 0.0
    out = tmp_path / "aiperf"
    try:
        run = subprocess.run(
            [aiperf, "profile", "--model", "tiny-mm", "--url", door.url, "--endpoint-type", "chat", "--streaming",
             "--tokenizer", str(bundle_dir / "llm"), "--synthetic-input-tokens-mean", "32",
             "--output-tokens-mean", str(OUTPUT_TOKENS), "--extra-inputs", "ignore_eos:true",
             "--image-batch-size", "1", "--image-width-mean", "320", "--image-height-mean", "240", "--image-format", "jpeg",
             "--request-count", str(REQUESTS), "--warmup-request-count", str(WARMUP), "--concurrency", str(CONCURRENCY),
             "--use-server-token-count", "--random-seed", "1", "--ui", "none", "--artifact-dir", str(out)],
            cwd=tmp_path, capture_output=True, text=True, timeout=AIPERF_TIMEOUT_S,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        report = json.loads((out / "profile_export_aiperf.json").read_text())
        door_metrics = door.metrics()
    finally:
        door.stop()
    assert report["request_count"]["avg"] == REQUESTS
    assert not report.get("error_summary"), report["error_summary"]
    assert report["num_images"]["avg"] == 1
    assert report["output_sequence_length"]["min"] == report["output_sequence_length"]["max"] == OUTPUT_TOKENS
    # The prompt counts the image's rows: more than the ~32 text tokens alone.
    assert report["input_sequence_length"]["min"] > 64
    assert report["time_to_first_token"]["count"] == REQUESTS
    assert door_metrics['mmtriton_openai_requests_total{endpoint="/v1/chat/completions",status="200"}'] == REQUESTS + WARMUP
    tokens_after = metric_sum(scrape_metrics(server.metrics_url), "mmtriton_engine_step_sequences_total") or 0.0
    assert tokens_after - tokens_before >= (REQUESTS + WARMUP) * OUTPUT_TOKENS
