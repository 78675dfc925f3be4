"""Before/after summary of two benchmark reports run separately (e.g. on a GPU host).

``python -m bench --compare`` runs both configurations with the same
sweep. When "before" is too slow for the same sweep (one request at a time at
9B scale), each side runs on its own; this writes the reference table from the
``report.json`` files: each "before" level against the "after" level of the
same concurrency, as ``summary.md``, ``summary.json`` and ``before_after.png``.

Example::

    python -m bench.summary --before B16/report.json B32/report.json --after A/report.json --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def level_figures(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level: concurrency, requests, errors, QPS, tok/s, latency avg/P99, TTFT, utilization, MBU, batch."""
    config = report["configs"][0]
    rows = []
    for level in config["levels"]:
        stats = level["stats"]
        rows.append(
            {
                "label": config["label"],
                "concurrency": level["concurrency"],
                "requests": stats["requests"],
                "errors": stats["errors"],
                "qps": stats["requests_per_s"],
                "output_tok_s": stats["output_tokens_per_s"],
                "latency_avg_s": stats["latency_avg_s"],
                "latency_p99_s": stats["latency_p99_s"],
                "ttft_avg_ms": stats["ttft_avg_s"] * 1000.0,
                "utilization_pct": level["utilization"]["mean_pct"],
                "utilization_source": level["utilization"]["source"],
                "mbu_pct": level["model_bandwidth_utilization_pct"],
                "mean_engine_batch": level["engine"]["mean_batch"],
            }
        )
    return rows


ROWS = (
    ("avg latency (s)", "latency_avg_s", "{:.2f}"),
    ("P99 latency (s)", "latency_p99_s", "{:.2f}"),
    ("QPS", "qps", "{:.3f}"),
    ("output tokens/s", "output_tok_s", "{:.1f}"),
    ("GPU utilization, NVML (%)", "utilization_pct", "{:.1f}"),
    ("model-bandwidth utilization (%)", "mbu_pct", "{:.1f}"),
    ("mean engine batch", "mean_engine_batch", "{:.2f}"),
    ("avg TTFT (ms)", "ttft_avg_ms", "{:.0f}"),
)


def summary_table(pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> str:
    """The reference experiment's table: per (before, after) pair, both figures and the change in %."""
    head, sep = "| |", "|---|"
    for b, a in pairs:
        head += (
            f" before c={b['concurrency']} ({b['requests']} req) | after c={a['concurrency']} ({a['requests']} req)"
            " | change |"
        )
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for name, key, fmt in ROWS:
        line = f"| {name} |"
        for b, a in pairs:
            change = (a[key] - b[key]) / b[key] * 100.0 if b[key] else float("nan")
            line += f" {fmt.format(b[key])} | {fmt.format(a[key])} | {change:+.0f}% |"
        lines.append(line)
    return "\n".join(lines)


def pair_levels(befores: list[dict[str, Any]], afters: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Before/after levels of equal concurrency; without any, the first before against every after."""
    by_c = {b["concurrency"]: b for b in befores}
    pairs = [(by_c[a["concurrency"]], a) for a in afters if a["concurrency"] in by_c]
    return pairs or [(befores[0], a) for a in afters]


def plot(pairs: list[tuple[dict[str, Any], dict[str, Any]]], path: Path) -> None:
    """Bars of tokens/s, P99 latency and utilization (NVML and model-bandwidth) per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for pair in pairs for r in pair]
    names = [f"{'before' if i % 2 == 0 else 'after'}\nc={r['concurrency']}" for i, r in enumerate(runs)]
    colors = ["#999999", "#2a7ab9"] * len(pairs)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].bar(names, [r["output_tok_s"] for r in runs], color=colors)
    axes[0].set_title("output tokens/s")
    axes[1].bar(names, [r["latency_p99_s"] for r in runs], color=colors)
    axes[1].set_title("P99 latency (s)")
    x = range(len(runs))
    axes[2].bar([i - 0.2 for i in x], [r["utilization_pct"] for r in runs], width=0.4, label="NVML GPU util")
    axes[2].bar([i + 0.2 for i in x], [r["mbu_pct"] for r in runs], width=0.4, label="model-bandwidth util")
    axes[2].set_xticks(list(x), names)
    axes[2].set_title("utilization (%)")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Write summary.md, summary.json and before_after.png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, nargs="+", required=True, help="report.json file(s) of the before side")
    parser.add_argument("--after", type=Path, nargs="+", required=True, help="report.json file(s) of the after side")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    befores = [lv for path in args.before for lv in level_figures(json.loads(path.read_text()))]
    afters = [lv for path in args.after for lv in level_figures(json.loads(path.read_text()))]
    args.out.mkdir(parents=True, exist_ok=True)
    pairs = pair_levels(befores, afters)
    table = summary_table(pairs)
    (args.out / "summary.md").write_text(table + "\n")
    (args.out / "summary.json").write_text(json.dumps({"before": befores, "after": afters}, indent=2) + "\n")
    plot(pairs, args.out / "before_after.png")
    print(table)  # noqa: T201 - CLI output
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
