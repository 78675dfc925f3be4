"""Preprocessing throughput: raw DALI in-process, served through Triton, and the CPU path.

For a 1280x960 JPEG and a 10 s 16 kHz WAV at each batch size:

* ``raw``: the model's own ``dali.py`` built in this process (GPU: ``device_id=0``,
  ``mixed`` decoding, GPU MFCC), fed full batches of the same sample;
* ``served``: ``image_preprocess`` / ``audio_preprocess`` on a running server,
  ``concurrency`` clients each sending one sample per request (dynamic batching
  forms the batches);
* ``cpu``: the same definition with ``device_id=None`` on the host's cores.

Example::

    python -m bench.preprocess --gpu-hf-repo build/repo-gpu-hf --cpu-repo build/repo-cpu \\
        --url localhost:8001 --batch 64,128 --out results/preprocess
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image


def samples() -> dict[str, bytes]:
    """The two benchmark payloads."""
    return {
        "image": encode_image(synthetic_image(1280, 960, seed=7), "JPEG"),
        "audio": encode_audio(synthetic_audio(16000, 10.0, seed=8), 16000, "WAV"),
    }


def raw_throughput(dali_py: Path, kind: str, data: bytes, batch: int, *, device_id: int | None, threads: int,
                   iterations: int = 10) -> float:
    """Samples/s of the pipeline definition run in-process on full batches (after 2 warm-up batches)."""
    from mmtriton.media.dali_runner import load_pipeline_module

    module = load_pipeline_module(dali_py)
    fn = module.image_preprocess if kind == "image" else module.audio_preprocess
    extra = {"decoder_device": "mixed" if device_id is not None else "cpu"} if kind == "image" else {
        "device": "gpu" if device_id is not None else "cpu"
    }
    pipe = fn(batch_size=batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1, **extra)
    pipe.build()
    payload = [np.frombuffer(data, np.uint8)] * batch
    for _ in range(2):
        pipe.feed_input(kind, payload)
        pipe.run()
    start = time.perf_counter()
    for _ in range(iterations):
        pipe.feed_input(kind, payload)
        outputs = pipe.run()
        if device_id is not None:
            outputs[0].as_cpu()  # wait for the GPU work of this batch
    return batch * iterations / (time.perf_counter() - start)


def served_throughput(url: str, kind: str, data: bytes, concurrency: int, requests: int) -> float:
    """Samples/s of ``<kind>_preprocess`` on a running server, one sample per request."""
    import tritonclient.grpc as grpcclient

    model = f"{kind}_preprocess"
    payload = np.frombuffer(data, np.uint8).reshape(1, -1)

    def worker(n: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput(kind, list(payload.shape), "UINT8")
        tensor.set_data_from_numpy(payload)
        for _ in range(n):
            client.infer(model, [tensor])
        client.close()

    per_worker = max(1, requests // concurrency)
    worker(2)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(worker, [per_worker] * concurrency))
    return per_worker * concurrency / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    """Run the preprocessing benchmark and write ``preprocess.json`` and ``preprocess.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-hf-repo", type=Path, required=True, help="rendered gpu-hf profile repository")
    parser.add_argument("--cpu-repo", type=Path, required=True, help="rendered cpu-profile repository")
    parser.add_argument("--url", help="gRPC host:port of a server running the cuda repository (served figures)")
    parser.add_argument("--batch", default="64,128")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI CPU threads")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batch.split(",")]
    data = samples()
    rows: list[dict[str, Any]] = []
    for kind in ("image", "audio"):
        gpu_py = args.gpu_hf_repo / f"{kind}_preprocess" / "1" / "dali.py"
        cpu_py = args.cpu_repo / f"{kind}_preprocess" / "1" / "dali.py"
        for batch in batches:
            row: dict[str, Any] = {"kind": kind, "batch": batch}
            row["raw_gpu"] = raw_throughput(gpu_py, kind, data[kind], batch, device_id=0, threads=4)
            row["cpu"] = raw_throughput(cpu_py, kind, data[kind], batch, device_id=None, threads=args.threads, iterations=3)
            if args.url:
                row["served_gpu"] = served_throughput(args.url, kind, data[kind], concurrency=batch, requests=4 * batch)
                row["served_over_raw"] = row["served_gpu"] / row["raw_gpu"]
            row["gpu_over_cpu"] = row["raw_gpu"] / row["cpu"]
            rows.append(row)
            print(json.dumps(row), flush=True)  # noqa: T201 - progress of a CLI
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {"image": "1280x960 JPEG", "audio": "10 s 16 kHz mono WAV", "cpu_threads": args.threads}
    (args.out / "preprocess.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2) + "\n")
    lines = [
        "| input | batch | raw DALI GPU (samples/s) | served GPU (samples/s) | CPU path (samples/s) | served/raw | GPU/CPU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        served = f"{r['served_gpu']:.0f}" if "served_gpu" in r else "-"
        ratio = f"{r['served_over_raw']:.2f}" if "served_over_raw" in r else "-"
        lines.append(
            f"| {settings[r['kind']]} | {r['batch']} | {r['raw_gpu']:.0f} | {served} | {r['cpu']:.0f} | {ratio} | {r['gpu_over_cpu']:.1f}x |"
        )
    (args.out / "preprocess.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
