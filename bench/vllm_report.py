"""Served gpu-vllm against vLLM in-process, one GPU, one run: tables, ratios and plots.

Reads what ``tools/vllm_measure.sh`` leaves in its output folder:

- ``inprocess.json`` (:mod:`bench.vllm_inprocess`): the anchor;
- ``served*/report.json`` (:mod:`bench` against the served gpu-vllm repository,
  paced streaming): the product;
- ``unpaced-rate<R>/report.json``: the same server with ``stream_chunk_rate=R``
  (0: every engine step streamed), which shows what per-token responses cost;
- ``before/report.json``: the same engine with one sequence at a time;
- ``hf/report.json``: today's transformers engine (gpu-hf profile), same workload.

Writes ``vllm-report.json``, ``vllm-report.md`` and ``vllm-served-vs-inprocess.png``.
The issue's targets are printed beside each ratio: served tok/s >= 0.9x in-process
at c >= 16, served P99 <= 1.2x, ITL at c=1 <= 1.5x the weight-read floor, MBU at
c=32 >= 55%.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.stats import flat_figures, fmt

TARGETS = {"tok_s_ratio": 0.9, "p99_ratio": 1.2, "itl_floor_ratio": 1.5, "mbu_pct": 55.0}


def bench_levels(folder: Path, pattern: str) -> tuple[dict[int, dict[str, Any]], dict[str, Any] | None]:
    """``{concurrency: level}`` over the bench ``report.json`` files matching ``pattern`` in
    ``folder`` (later files win), and the first of those reports (hardware, versions), or None."""
    levels: dict[int, dict[str, Any]] = {}
    meta = None
    for path in sorted(folder.glob(pattern)):
        data = json.loads(path.read_text())
        meta = meta or data
        for config in data["configs"]:
            for level in config["levels"]:
                levels[int(level["concurrency"])] = level
    return levels, meta


def _served(folder: Path, name: str) -> dict[int, dict[str, Any]]:
    return bench_levels(folder, f"{name}*/**/report.json")[0]


def _row(level: dict[str, Any] | None) -> dict[str, Any] | None:
    """The figures of one served level, flat."""
    if level is None:
        return None
    return {
        **flat_figures(level["stats"]),
        "mean_batch": level["engine"].get("mean_batch"),
        "mbu_pct": level.get("model_bandwidth_utilization_pct"),
        "gpu_util_pct": level["utilization"].get("mean_pct"),
        "models": level.get("models", {}),
    }


def build(folder: Path, floor_ms: float | None) -> dict[str, Any]:
    """Join the run's files into one comparison (see the module docstring)."""
    anchor = json.loads((folder / "inprocess.json").read_text())
    inproc = {lv["concurrency"]: flat_figures(lv) for lv in anchor["levels"]}
    served_levels, meta = bench_levels(folder, "served*/**/report.json")
    served = {c: _row(lv) for c, lv in served_levels.items()}
    variants = {
        path.name.removeprefix("unpaced-"): {c: _row(lv) for c, lv in _served(folder, path.name).items()}
        for path in sorted(folder.glob("unpaced-rate*"))
    }
    before = {c: _row(lv) for c, lv in _served(folder, "before").items()}
    hf = {c: _row(lv) for c, lv in _served(folder, "hf").items()}
    rows = []
    for c in sorted(inproc):
        a, s = inproc[c], served.get(c)
        row: dict[str, Any] = {"concurrency": c, "inprocess": a, "served": s, "variants": {}}
        if s is not None:
            row["tok_s_ratio"] = s["tok_s"] / a["tok_s"]
            row["p99_ratio"] = s["p99_s"] / a["p99_s"]
        for name, levels in variants.items():
            u = levels.get(c)
            if u is not None:
                row["variants"][name] = {**u, "tok_s_ratio": u["tok_s"] / a["tok_s"], "p99_ratio": u["p99_s"] / a["p99_s"]}
        rows.append(row)
    meta = meta or {}
    return {
        "hardware": meta.get("hardware"),
        "versions": {**meta.get("versions", {}), "vllm": anchor.get("vllm")},
        "engine_args": anchor.get("engine_args"),
        "workload": anchor.get("workload"),
        "weight_read_floor_ms": floor_ms,
        "targets": TARGETS,
        "levels": rows,
        "before": before,
        "hf": hf,
    }


def markdown(report: dict[str, Any]) -> str:
    """The comparison as Markdown tables."""
    hw = report.get("hardware") or {}
    lines = [
        "# Served gpu-vllm vs vLLM in-process",
        "",
        f"GPU: {hw.get('gpu_model')} (driver {hw.get('driver_version')}); versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted((report.get("versions") or {}).items()) if v),
        "",
        f"Engine settings (both sides): `{json.dumps(report.get('engine_args'))}`.",
        "",
        "| c | in-process tok/s | served tok/s | ratio | in-process P99 (s) | served P99 (s) | ratio "
        "| TTFT in-process / served (ms) | ITL in-process / served (ms) | served MBU | mean batch | NVML util |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["levels"]:
        a, s = row["inprocess"], row["served"] or {}
        lines.append(
            f"| {row['concurrency']} | {a['tok_s']:.0f} | {fmt(s.get('tok_s'), '.0f')} | {fmt(row.get('tok_s_ratio'), '.2f')} "
            f"| {a['p99_s']:.2f} | {fmt(s.get('p99_s'), '.2f')} | {fmt(row.get('p99_ratio'), '.2f')} "
            f"| {a['ttft_ms']:.0f} / {fmt(s.get('ttft_ms'), '.0f')} | {a['itl_ms']:.2f} / {fmt(s.get('itl_ms'), '.2f')} "
            f"| {fmt(s.get('mbu_pct'), '.1f')}% | {fmt(s.get('mean_batch'), '.1f')} | {fmt(s.get('gpu_util_pct'), '.0f')}% |"
        )
    floor = report.get("weight_read_floor_ms")
    c1 = next((r for r in report["levels"] if r["concurrency"] == 1), None)
    if floor and c1 and c1["served"]:
        lines += ["", f"ITL at c=1: served {c1['served']['itl_ms']:.2f} ms = "
                  f"{c1['served']['itl_ms'] / floor:.2f}x the weight-read floor of {floor:.2f} ms "
                  f"(in-process {c1['inprocess']['itl_ms'] / floor:.2f}x)."]
    variants = sorted({name for r in report["levels"] for name in r["variants"]})
    if variants:
        lines += ["", "Other `stream_chunk_rate` values (0: every engine step is one response), same server otherwise; "
                  "the served rows above use the spec's rate:", "",
                  "| rate | c | tok/s | ratio to in-process | P99 (s) | ratio | ITL P99 (ms) "
                  "| postprocessing requests | their queue (ms) | their compute (ms) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in variants:
            for row in report["levels"]:
                u = row["variants"].get(name)
                if not u:
                    continue
                post = u["models"].get("postprocessing", {})
                lines.append(
                    f"| {name.removeprefix('rate')} | {row['concurrency']} | {u['tok_s']:.0f} | {u['tok_s_ratio']:.2f} "
                    f"| {u['p99_s']:.2f} | {u['p99_ratio']:.2f} | {u['itl_p99_ms']:.1f} | {post.get('success', 'n/a')} "
                    f"| {fmt(post.get('queue_ms'), '.2f')} | {fmt(post.get('compute_infer_ms'), '.2f')} |"
                )
        lines += ["", "The served rows' own postprocessing figures:", "",
                  "| c | postprocessing requests | their queue (ms) | their compute (ms) | ITL P99 (ms) |",
                  "|---:|---:|---:|---:|---:|"]
        for row in report["levels"]:
            s = row["served"]
            if s:
                post = s["models"].get("postprocessing", {})
                lines.append(f"| {row['concurrency']} | {post.get('success', 'n/a')} | {fmt(post.get('queue_ms'), '.2f')} "
                             f"| {fmt(post.get('compute_infer_ms'), '.2f')} | {s['itl_p99_ms']:.1f} |")
    lines += ["", "Before / after (served, same workload): one sequence at a time vs in-flight batching; "
              "today's transformers engine beside them.", "",
              "| engine | c | avg latency (s) | QPS | NVML util | P99 (s) | output tok/s | MBU |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    served = {r["concurrency"]: r["served"] for r in report["levels"] if r["served"]}
    for label, levels in (("vLLM, one sequence at a time (before)", report["before"]),
                          ("vLLM, in-flight batching (after)", {c: served[c] for c in report["before"] if c in served}),
                          ("transformers continuous batching", report["hf"])):
        for c, r in sorted(levels.items()):
            lines.append(
                f"| {label} | {c} | {r['latency_avg_s']:.2f} | {r['req_s']:.2f} | {fmt(r['gpu_util_pct'], '.0f')}% "
                f"| {r['p99_s']:.2f} | {r['tok_s']:.0f} | {fmt(r['mbu_pct'], '.1f')}% |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and P99 against concurrency: in-process, served, unpaced, transformers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    series = {
        "vLLM in-process": {r["concurrency"]: r["inprocess"] for r in report["levels"]},
        "served gpu-vllm": {r["concurrency"]: r["served"] for r in report["levels"] if r["served"]},
        "served transformers engine": report["hf"],
        "served vLLM, one sequence at a time": report["before"],
    }
    for name in sorted({n for r in report["levels"] for n in r["variants"]}):
        label = "served, every step streamed" if name == "rate0" else f"served, stream_chunk_rate {name[4:]}"
        series[label] = {r["concurrency"]: r["variants"][name] for r in report["levels"] if name in r["variants"]}
    for label, levels in series.items():
        if not levels:
            continue
        cs = sorted(levels)
        ax_tp.plot(cs, [levels[c]["tok_s"] for c in cs], "o-", label=label)
        ax_lat.plot(cs, [levels[c]["p99_s"] for c in cs], "o-", label=label)
    ax_tp.set(xlabel="concurrent requests", ylabel="output tokens/s", title="Throughput")
    ax_lat.set(xlabel="concurrent requests", ylabel="P99 latency (s)", title="P99 latency")
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax_tp.legend(fontsize=8)
    hw = report.get("hardware") or {}
    fig.suptitle(f"9B shape, 512+-32 in / 256 out, 1/4 image, 1/4 10 s clip - {hw.get('gpu_model')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI: build the report from a ``tools/vllm_measure.sh`` output folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--floor-ms", type=float, help="weight-read floor: weight bytes / copy bandwidth (ms)")
    args = parser.parse_args(argv)
    report = build(args.folder, args.floor_ms)
    (args.folder / "vllm-report.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.folder / "vllm-report.md").write_text(markdown(report))
    plot(report, args.folder / "vllm-served-vs-inprocess.png")
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
