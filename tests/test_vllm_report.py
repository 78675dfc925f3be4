"""bench.vllm_report on the committed H200 run: ratios and rows against the raw files themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import vllm_report

RUN = Path(__file__).resolve().parent.parent / "docs" / "measurements" / "h200-2026-12-02-vllm-served"


def _served_levels() -> dict[int, dict]:
    levels = {}
    for name in ("served-c1", "served"):
        for level in json.loads((RUN / name / "report.json").read_text())["configs"][0]["levels"]:
            levels[level["concurrency"]] = level
    return levels


def test_ratios_and_rows_match_the_raw_reports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    floor = json.loads((run / "bandwidth.json").read_text())["weight_read_floor_ms"]
    report = vllm_report.build(run, floor)
    anchor = {lv["concurrency"]: lv for lv in json.loads((run / "inprocess.json").read_text())["levels"]}
    served = _served_levels()
    assert [row["concurrency"] for row in report["levels"]] == sorted(anchor) == [1, 16, 32, 64]
    for row in report["levels"]:
        c = row["concurrency"]
        s, a = served[c]["stats"], anchor[c]
        assert row["tok_s_ratio"] == pytest.approx(s["output_tokens_per_s"] / a["output_tokens_per_s"], rel=1e-12)
        assert row["p99_ratio"] == pytest.approx(s["latency_p99_s"] / a["latency_p99_s"], rel=1e-12)
        assert row["served"]["itl_ms"] == pytest.approx(s["itl_avg_s"] * 1000, rel=1e-12)
        assert row["served"]["mbu_pct"] == served[c]["model_bandwidth_utilization_pct"]
    before = json.loads((run / "before" / "report.json").read_text())["configs"][0]["levels"][0]
    assert report["before"][16]["tok_s"] == before["stats"]["output_tokens_per_s"]
    text = vllm_report.markdown(report)
    ratio_32 = served[32]["stats"]["output_tokens_per_s"] / anchor[32]["output_tokens_per_s"]
    assert f"| {ratio_32:.2f} |" in text and "weight-read floor" in text
    vllm_report.plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_other_stream_rates_are_reported_beside_the_served_rows(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    # A second rate: the served report again under another folder name, as tools/vllm_measure.sh writes it.
    shutil.copytree(run / "served", run / "unpaced-rate2000" / "x")
    report = vllm_report.build(run, None)
    by_c = {row["concurrency"]: row for row in report["levels"]}
    assert set(by_c[32]["variants"]) == {"rate2000"} and not by_c[1]["variants"]
    assert by_c[32]["variants"]["rate2000"]["tok_s_ratio"] == pytest.approx(by_c[32]["tok_s_ratio"])
    assert "| 2000 | 32 |" in vllm_report.markdown(report)
