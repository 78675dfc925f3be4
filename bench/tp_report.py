"""TP=1 against TP=2 on the served gpu-vllm repository, each beside vLLM in-process: per-GPU figures and report.

Two commands, both used by ``tools/tp_measure.sh`` (the served steps run ``python -m bench``,
whose levels hold NVML utilization and memory per GPU: ``utilization.gpus``, see
:mod:`bench.utilization`):

- ``python -m bench.tp_report placement REPO [--out FILE]`` says where every model of
  a rendered repository runs (the render pins the DALI and encoder instances to GPU 0,
  away from vLLM's other ranks).
- ``python -m bench.tp_report report FOLDER`` joins what the script leaves in its
  folder into ``tp-report.json``, ``tp-report.md`` and ``tp-report.png``:

  - ``bandwidth.json``: weight bytes and each GPU's copy bandwidth;
  - ``inprocess-tp1.json``, ``inprocess-tp2.json`` (:mod:`bench.vllm_inprocess`);
  - ``served-tp<N>-c1/**/report.json``, ``served-tp<N>/**/report.json`` (:mod:`bench`);
  - ``placement-tp<N>.json``; ``skipped-<step>.txt`` for a step that did not run.

Per GPU, model-bandwidth utilization counts the weights each rank reads per engine
step: ``MBU_gpu = (weight_bytes / TP) x steps/s / copy_bandwidth_gpu`` (the
benchmark's own ``model_bandwidth_utilization_pct`` counts all weights against one
GPU's bandwidth, i.e. the sum over ranks at TP=2). The issue's targets: served TP=2
tok/s >= 0.9x in-process TP=2 at every c >= 16; served TP=2 ITL at c=1 below TP=1's.
A missing side (TP=2 on a one-GPU host) is reported as not run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bench.stats import flat_figures, fmt
from bench.vllm_report import bench_levels

LOGGER = logging.getLogger(__name__)
GIB = float(1 << 30)

#: What tools/tp_measure.sh exports before it starts anything: NVLink multicast off in every process.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
#: Served TP=2 tok/s over in-process TP=2 at c >= TARGET_MIN_C.
TARGET_SERVED_RATIO = 0.9
TARGET_MIN_C = 16
TP_SIZES = (1, 2)
#: The metric series read per GPU (Triton docs/user_guide/metrics.md, "GPU Metrics", label gpu_uuid).
# --------------------------------------------------------------------------------------------- placement


def _kind_name(kind: int) -> str:
    from tritonclient.grpc import model_config_pb2 as mc

    return mc.ModelInstanceGroup.Kind.Name(kind)


def placement(repo: Path) -> dict[str, Any]:
    """Where each model of a rendered repository runs.

    Args:
        repo: A rendered model repository.

    Returns:
        ``{"repo", "tensor_parallel_size", "models": {name:
        {"groups": [{"kind", "count", "gpus"}], "device"}}}``; ``gpus`` is None for a
        group Triton places on every visible GPU; ``device`` is the encoder's ``device``
        parameter or the DALI pipeline's ``device_id`` (what the model's code runs on).
    """
    from mmtriton.serving.triton_config import parse_model_config

    models: dict[str, Any] = {}
    tp = None
    for path in sorted(repo.glob("*/config.pbtxt")):
        name = path.parent.name
        config = parse_model_config(path.read_text(), str(path))
        if config.platform == "ensemble":
            continue
        params = {k: v.string_value for k, v in config.parameters.items()}
        device: Any = params.get("device")
        pre = path.parent / "1" / "preprocess.json"
        if device is None and pre.is_file():
            device = f"device_id {json.loads(pre.read_text()).get('device_id')}"
        if "tensor_parallel_size" in params:
            tp = int(params["tensor_parallel_size"])
            device = f"vLLM ranks on the first {tp} visible GPU(s)"
        models[name] = {
            "groups": [
                {"kind": _kind_name(g.kind), "count": int(g.count), "gpus": list(g.gpus) or None}
                for g in config.instance_group
            ],
            "device": device,
        }
    return {"repo": str(repo), "tensor_parallel_size": tp, "models": models}


# ------------------------------------------------------------------------------------------------ report


def mbu_per_gpu_pct(weight_bytes: float, tp: int, steps_per_s: float, bandwidth_gbs: float) -> float:
    """Model-bandwidth utilization of one GPU: it reads ``weight_bytes / tp`` per engine step."""
    return 100.0 * (weight_bytes / tp) * steps_per_s / (bandwidth_gbs * 1e9)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _gpu_table(bandwidth: dict[str, Any]) -> list[dict[str, Any]]:
    """The host's GPUs with their copy bandwidth (a one-GPU ``bandwidth.json`` without ``gpus`` too)."""
    if bandwidth.get("gpus"):
        return list(bandwidth["gpus"])
    gbs = bandwidth["copy_bandwidth_gbs"]
    return [{"index": 0, "name": bandwidth.get("gpu"), "uuid": None, "copy_bandwidth_gbs": gbs}]


def _norm_uuid(uuid: str | None) -> str | None:
    return None if uuid is None else uuid.lower().removeprefix("gpu-")


def served_row(
    level: dict[str, Any], tp: int, gpus: list[dict[str, Any]], weight_bytes: float | None
) -> dict[str, Any]:
    """One served level, flat, with figures and MBU per GPU.

    Args:
        level: A level of a bench ``report.json``.
        tp: Its tensor parallel size: ranks 0..tp-1 run on the host's first tp GPUs.
        gpus: :func:`_gpu_table` of ``bandwidth.json``.
        weight_bytes: All LLM weights.
    """
    s = level["stats"]
    engine = level.get("engine") or {}
    steps = engine.get("steps_per_s")
    sampled = (level.get("utilization") or {}).get("gpus") or {}
    by_uuid = {_norm_uuid(u): figures for u, figures in sampled.items()}
    per_gpu = []
    for gpu in gpus:
        figures = by_uuid.pop(_norm_uuid(gpu.get("uuid")), None) if gpu.get("uuid") else None
        if figures is None and len(gpus) == 1 and len(sampled) == 1:
            figures = next(iter(sampled.values()))  # one GPU either way, whatever its label
            by_uuid.clear()
        if figures is None and not sampled and len(gpus) == 1 and level.get("utilization", {}).get("source") == "gpu":
            # A report without per-GPU series from a one-GPU host: bench's mean over GPUs is that GPU's.
            u = level["utilization"]
            figures = {"util_mean_pct": u.get("mean_pct"), "util_max_pct": u.get("max_pct")}
            figures["memory_used_max_bytes"] = None
        rank = gpu["index"] < tp
        if figures is None and not rank:
            continue
        per_gpu.append(
            {
                "gpu": gpu["index"],
                "name": gpu.get("name"),
                "rank": gpu["index"] if rank else None,
                "copy_bandwidth_gbs": gpu["copy_bandwidth_gbs"],
                "mbu_pct": mbu_per_gpu_pct(weight_bytes, tp, steps, gpu["copy_bandwidth_gbs"])
                if rank and steps and weight_bytes
                else None,
                **(figures or {"util_mean_pct": None, "util_max_pct": None, "memory_used_max_bytes": None}),
            }
        )
    for uuid, figures in by_uuid.items():  # sampled GPUs bandwidth.json does not list
        unlisted = {"gpu": uuid, "name": None, "rank": None, "copy_bandwidth_gbs": None, "mbu_pct": None}
        per_gpu.append({**unlisted, **figures})
    return {
        **flat_figures(s),
        "steps_per_s": steps,
        "mean_batch": engine.get("mean_batch"),
        "bench_mbu_pct": level.get("model_bandwidth_utilization_pct"),
        "nvml_util_mean_pct": (level.get("utilization") or {}).get("mean_pct"),
        "gpus": per_gpu,
    }


def inprocess_row(level: dict[str, Any]) -> dict[str, Any]:
    """One level of a :mod:`bench.vllm_inprocess` file, flat."""
    return flat_figures(level)


RATIO_KEYS = ("tok_s", "p99_s", "ttft_ms", "itl_ms")


def _ratios(num: dict[str, Any] | None, den: dict[str, Any] | None) -> dict[str, float | None] | None:
    if num is None or den is None:
        return None
    return {key: _ratio(num[key], den[key]) for key in RATIO_KEYS}


def _not_run(folder: Path, step: str) -> str:
    skipped = folder / f"skipped-{step}.txt"
    return skipped.read_text().strip() if skipped.is_file() else f"{step}: no results in {folder.name}/ (step not run)"


def build(folder: Path) -> dict[str, Any]:
    """Join the run's files (see the module docstring) into one report; missing pieces are listed as not run."""
    bandwidth = json.loads((folder / "bandwidth.json").read_text()) if (folder / "bandwidth.json").is_file() else {}
    gpus = _gpu_table(bandwidth) if bandwidth else []
    weights = bandwidth.get("weight_bytes")
    sides: dict[str, dict[int, dict[int, dict[str, Any]]]] = {"served": {}, "inprocess": {}}
    not_run: list[str] = []
    meta: dict[str, Any] | None = None
    engine_args: dict[int, Any] = {}
    placements: dict[int, Any] = {}
    for tp in TP_SIZES:
        levels: dict[int, dict[str, Any]] = {}
        report = None
        for pattern in (f"served-tp{tp}-c1/**/report.json", f"served-tp{tp}/**/report.json"):
            found, data = bench_levels(folder, pattern)
            levels.update(found)
            report = report or data
        meta = meta or report
        if levels:
            sides["served"][tp] = {c: served_row(lv, tp, gpus, weights) for c, lv in levels.items()}
        else:
            not_run.append(_not_run(folder, f"served-tp{tp}"))
        anchor = folder / f"inprocess-tp{tp}.json"
        if anchor.is_file():
            data = json.loads(anchor.read_text())
            engine_args[tp] = data.get("engine_args")
            sides["inprocess"][tp] = {int(lv["concurrency"]): inprocess_row(lv) for lv in data["levels"]}
        else:
            not_run.append(_not_run(folder, f"inprocess-tp{tp}"))
        place = folder / f"placement-tp{tp}.json"
        if place.is_file():
            placements[tp] = json.loads(place.read_text())
    concurrency = sorted({c for side in sides.values() for levels in side.values() for c in levels})
    rows = []
    for c in concurrency:
        served = {tp: sides["served"].get(tp, {}).get(c) for tp in TP_SIZES}
        inproc = {tp: sides["inprocess"].get(tp, {}).get(c) for tp in TP_SIZES}
        row: dict[str, Any] = {
            "concurrency": c,
            "served": {str(tp): served[tp] for tp in TP_SIZES},
            "inprocess": {str(tp): inproc[tp] for tp in TP_SIZES},
            "served_tp2_over_tp1": _ratios(served[2], served[1]),
            "inprocess_tp2_over_tp1": _ratios(inproc[2], inproc[1]),
            "served_over_inprocess": {str(tp): _ratios(served[tp], inproc[tp]) for tp in TP_SIZES},
        }
        ratio = (row["served_over_inprocess"]["2"] or {}).get("tok_s")
        row["target_served_tp2_ok"] = None if c < TARGET_MIN_C or ratio is None else ratio >= TARGET_SERVED_RATIO
        rows.append(row)
    c1 = next((r for r in rows if r["concurrency"] == 1), None)
    itl = None
    if c1 and c1["served"]["1"] and c1["served"]["2"]:
        itl = {"tp1_ms": c1["served"]["1"]["itl_ms"], "tp2_ms": c1["served"]["2"]["itl_ms"]}
        itl["ok"] = itl["tp2_ms"] < itl["tp1_ms"]
    floors = {
        str(tp): weights / tp / (gpus[0]["copy_bandwidth_gbs"] * 1e9) * 1e3 if weights and gpus else None
        for tp in TP_SIZES
    }
    anchor_meta = next(
        (json.loads((folder / f"inprocess-tp{tp}.json").read_text()) for tp in TP_SIZES
         if (folder / f"inprocess-tp{tp}.json").is_file()),
        {},
    )
    return {
        "hardware": (meta or {}).get("hardware"),
        "versions": {**(meta or {}).get("versions", {}), "vllm": anchor_meta.get("vllm")},
        "git": (meta or {}).get("git"),
        "workload": anchor_meta.get("workload") or (meta or {}).get("settings"),
        "engine_args": {str(tp): args for tp, args in engine_args.items()},
        "nvlink_multicast_off": NVLINK_MULTICAST_OFF,
        "weight_bytes": weights,
        "gpus": gpus,
        "weight_read_floor_ms": floors,
        "placement": {str(tp): p for tp, p in placements.items()},
        "targets": {
            "served_tp2_over_inprocess_tp2_tok_s_min": TARGET_SERVED_RATIO,
            "at_concurrency_min": TARGET_MIN_C,
            "served_itl_c1_tp2_below_tp1": True,
        },
        "itl_c1": itl,
        "levels": rows,
        "not_run": not_run,
    }


def _pct(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else f"{value:{spec}}%"


def _ok(value: bool | None) -> str:
    return "n/a" if value is None else ("**yes**" if value else "**no**")


def _where(group: dict[str, Any]) -> str:
    if group["kind"] != "KIND_GPU":
        return ""
    return f" on GPU {', '.join(map(str, group['gpus']))}" if group["gpus"] else " on every visible GPU"


def _placement_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for tp, place in sorted(report["placement"].items()):
        lines += [f"Where the models run (TP={tp}, `{place['repo']}`):", "", "| model | instances | device |",
                  "|---|---|---|"]
        for name, model in sorted(place["models"].items()):
            groups = "; ".join(f"{g['count']} x {g['kind']}{_where(g)}" for g in model["groups"])
            lines.append(f"| {name} | {groups} | {model['device'] or ''} |")
        lines.append("")
    return lines


SIDE_HEADER = (
    "| c | tok/s TP=1 | tok/s TP=2 | ratio | P99 (s) TP=1 | TP=2 | ratio | TTFT (ms) TP=1 / TP=2 | ratio "
    "| ITL (ms) TP=1 / TP=2 | ratio |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
)


def markdown(report: dict[str, Any]) -> str:
    """The comparison as Markdown."""
    hw = report.get("hardware") or {}
    lines = [
        "# Tensor parallelism: served gpu-vllm TP=1 vs TP=2, beside vLLM in-process",
        "",
        f"GPU: {hw.get('gpu_model')} x {hw.get('gpu_count')} (driver {hw.get('driver_version')}); versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted((report.get("versions") or {}).items()) if v),
        "",
        "NVLink multicast off in every process: "
        + ", ".join(f"`{k}={v}`" for k, v in report["nvlink_multicast_off"].items()) + ".",
        "",
    ]
    for tp, args in sorted(report["engine_args"].items()):
        lines += [f"Engine settings TP={tp} (both sides): `{json.dumps(args)}`.", ""]
    if report["not_run"]:
        lines += ["**Not run:**", ""] + [f"- {why}" for why in report["not_run"]] + [""]
    lines += [
        "Served (gpu-vllm through Triton), TP=2 / TP=1:",
        "",
        *SIDE_HEADER,
    ]

    def side_table(key: str, ratio_key: str) -> list[str]:
        out = []
        for row in report["levels"]:
            a, b, r = row[key]["1"] or {}, row[key]["2"] or {}, row[ratio_key] or {}
            out.append(
                f"| {row['concurrency']} | {fmt(a.get('tok_s'), '.0f')} | {fmt(b.get('tok_s'), '.0f')} "
                f"| {fmt(r.get('tok_s'), '.2f')} | {fmt(a.get('p99_s'), '.2f')} | {fmt(b.get('p99_s'), '.2f')} "
                f"| {fmt(r.get('p99_s'), '.2f')} | {fmt(a.get('ttft_ms'), '.0f')} / {fmt(b.get('ttft_ms'), '.0f')} "
                f"| {fmt(r.get('ttft_ms'), '.2f')} | {fmt(a.get('itl_ms'), '.2f')} / {fmt(b.get('itl_ms'), '.2f')} "
                f"| {fmt(r.get('itl_ms'), '.2f')} |"
            )
        return out

    lines += side_table("served", "served_tp2_over_tp1")
    lines += ["", "vLLM AsyncLLM in-process, TP=2 / TP=1:", "", *SIDE_HEADER]
    lines += side_table("inprocess", "inprocess_tp2_over_tp1")
    lines += [
        "",
        f"Served over in-process (target: TP=2 tok/s >= {TARGET_SERVED_RATIO}x at c >= {TARGET_MIN_C}):",
        "",
        "| c | TP=1 tok/s ratio | TP=1 P99 ratio | TP=2 in-process tok/s | TP=2 served tok/s | TP=2 tok/s ratio "
        "| TP=2 P99 ratio | target met |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["levels"]:
        r1, r2 = row["served_over_inprocess"]["1"] or {}, row["served_over_inprocess"]["2"] or {}
        a2, s2 = row["inprocess"]["2"] or {}, row["served"]["2"] or {}
        lines.append(
            f"| {row['concurrency']} | {fmt(r1.get('tok_s'), '.2f')} | {fmt(r1.get('p99_s'), '.2f')} "
            f"| {fmt(a2.get('tok_s'), '.0f')} | {fmt(s2.get('tok_s'), '.0f')} "
            f"| {fmt(r2.get('tok_s'), '.2f')} | {fmt(r2.get('p99_s'), '.2f')} | {_ok(row['target_served_tp2_ok'])} |"
        )
    itl = report.get("itl_c1")
    lines += [""]
    if itl:
        lines.append(f"Served ITL at c=1: TP=2 {itl['tp2_ms']:.2f} ms, TP=1 {itl['tp1_ms']:.2f} ms "
                     f"(target: TP=2 below TP=1): {_ok(itl['ok'])}.")
    else:
        lines.append("Served ITL at c=1, TP=2 against TP=1: n/a (a side was not run).")
    floors = report["weight_read_floor_ms"]
    lines += ["", f"Weight-read floor per decode step (GPU 0's copy bandwidth): TP=1 {fmt(floors['1'], '.2f')} ms, "
              f"TP=2 {fmt(floors['2'], '.2f')} ms (each rank reads half the weights).", ""]
    lines += [
        "Per GPU, served (NVML utilization and memory from Triton's `/metrics`, sampled during the level; "
        "MBU = weight bytes / TP x engine steps/s / the GPU's copy bandwidth):",
        "",
        "| TP | c | GPU | rank | NVML util mean / max | memory used max (GiB) | engine steps/s | MBU |",
        "|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    for tp in ("1", "2"):
        for row in report["levels"]:
            s = row["served"][tp]
            if not s:
                continue
            for g in s["gpus"]:
                mem = g.get("memory_used_max_bytes")
                lines.append(
                    f"| {tp} | {row['concurrency']} | {g['gpu']} | {fmt(g['rank'], 'd')} "
                    f"| {_pct(g.get('util_mean_pct'))} / {_pct(g.get('util_max_pct'))} "
                    f"| {fmt(None if mem is None else mem / GIB, '.1f')} | {fmt(s['steps_per_s'], '.1f')} "
                    f"| {_pct(g['mbu_pct'], '.1f')} |"
                )
    lines += [""] + _placement_lines(report)
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Throughput and P99 against concurrency (served / in-process, TP=1 / TP=2), per-GPU NVML utilization bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat, ax_util) = plt.subplots(1, 3, figsize=(15, 4.4))
    styles = {("served", "1"): "o-", ("served", "2"): "s-", ("inprocess", "1"): "o--", ("inprocess", "2"): "s--"}
    for (side, tp), style in styles.items():
        points = [(r["concurrency"], r[side][tp]) for r in report["levels"] if r[side][tp]]
        if not points:
            continue
        label = f"{'served gpu-vllm' if side == 'served' else 'vLLM in-process'} TP={tp}"
        cs = [c for c, _ in points]
        ax_tp.plot(cs, [p["tok_s"] for _, p in points], style, label=label)
        ax_lat.plot(cs, [p["p99_s"] for _, p in points], style, label=label)
    for ax, title, ylabel in ((ax_tp, "Throughput", "output tokens/s"), (ax_lat, "P99 latency", "seconds")):
        ax.set(xlabel="concurrent requests", ylabel=ylabel, title=title)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    ax_tp.legend(fontsize=8)
    bars = []  # (label, {c: util})
    for tp in ("1", "2"):
        gpus = sorted({g["gpu"] for r in report["levels"] if r["served"][tp] for g in r["served"][tp]["gpus"]}, key=str)
        for gpu in gpus:
            values = {
                r["concurrency"]: g.get("util_mean_pct")
                for r in report["levels"] if r["served"][tp]
                for g in r["served"][tp]["gpus"] if g["gpu"] == gpu
            }
            bars.append((f"TP={tp} GPU {gpu}", values))
    cs = [r["concurrency"] for r in report["levels"]]
    width = 0.8 / max(1, len(bars))
    for i, (label, values) in enumerate(bars):
        x = [j + i * width for j in range(len(cs))]
        ax_util.bar(x, [values.get(c) or 0.0 for c in cs], width, label=label)
    ax_util.set_xticks([j + width * (len(bars) - 1) / 2 for j in range(len(cs))], [str(c) for c in cs])
    ax_util.set(xlabel="concurrent requests", ylabel="NVML utilization mean (%)", title="Served, per GPU")
    ax_util.set_ylim(0, 105)
    ax_util.grid(alpha=0.3, axis="y")
    if bars:
        ax_util.legend(fontsize=8)
    if report["not_run"]:
        ax_util.text(0.02, 0.02, "not run: " + "; ".join(w.split(":")[0] for w in report["not_run"]),
                     transform=ax_util.transAxes, fontsize=7, va="bottom")
    hw = report.get("hardware") or {}
    fig.suptitle(f"9B shape, 512+-32 in / 256 out, 1/4 image, 1/4 10 s clip - {hw.get('gpu_model')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(folder: Path) -> dict[str, Any]:
    """Build the report and write ``tp-report.json``, ``tp-report.md`` and ``tp-report.png`` into ``folder``."""
    report = build(folder)
    (folder / "tp-report.json").write_text(json.dumps(report, indent=1) + "\n")
    (folder / "tp-report.md").write_text(markdown(report))
    plot(report, folder / "tp-report.png")
    return report


def main(argv: list[str] | None = None) -> int:
    """CLI: ``placement REPO`` or ``report FOLDER`` (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.tp_report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    place = sub.add_parser("placement", help="where each model of a rendered repository runs")
    place.add_argument("repo", type=Path)
    place.add_argument("--out", type=Path)
    rep = sub.add_parser("report", help="join a tools/tp_measure.sh folder into tp-report.{json,md,png}")
    rep.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.command == "placement":
        result = placement(args.repo)
        text = json.dumps(result, indent=1) + "\n"
        if args.out:
            args.out.write_text(text)
        sys.stdout.write(text)
        return 0
    report = write(args.folder)
    sys.stdout.write(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
