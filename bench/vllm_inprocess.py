"""vLLM's own AsyncLLM in-process: the anchor the served gpu-vllm figures are compared with.

Same engine settings as the gpu-vllm repository renders (max_num_seqs = the spec's batch,
CUDA graphs, prefix caching), text-only token-id prompts of ``--input-tokens`` +-
``--input-spread`` random ids and ``--output-tokens`` fixed (``ignore_eos``), closed loop
at each concurrency. Prints and writes JSON: output tok/s, latency P50/P99, TTFT, ITL.

    python -m bench.vllm_inprocess --model build/bundles/glm4-9b-shape/llm --max-num-seqs 64 \\
        --concurrency 16,32 --requests 64 --out results/vllm-inprocess.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


async def _run_level(engine, prompts: list[list[int]], output_tokens: int, concurrency: int) -> dict:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    params = SamplingParams(
        max_tokens=output_tokens, ignore_eos=True, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.DELTA
    )
    pending = list(enumerate(prompts))
    records: list[dict] = []

    async def worker() -> None:
        while pending:
            index, ids = pending.pop()
            start = time.perf_counter()
            times: list[float] = []
            async for out in engine.generate({"prompt_token_ids": ids}, params, f"r{concurrency}-{index}"):
                times += [time.perf_counter()] * len(out.outputs[0].token_ids)
            records.append({"start": start, "times": times})

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - began
    latency = np.array([r["times"][-1] - r["start"] for r in records])
    ttft = np.array([r["times"][0] - r["start"] for r in records])
    itl = np.concatenate([np.diff(r["times"]) for r in records if len(r["times"]) > 1])
    tokens = sum(len(r["times"]) for r in records)
    return {
        "concurrency": concurrency,
        "requests": len(records),
        "output_tokens_per_s": tokens / wall,
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p99_s": float(np.percentile(latency, 99)),
        "ttft_mean_ms": float(ttft.mean() * 1000),
        "itl_mean_ms": float(itl.mean() * 1000),
    }


async def _main(args: argparse.Namespace) -> list[dict]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(
        AsyncEngineArgs(
            model=str(args.model),
            skip_tokenizer_init=True,
            enable_prompt_embeds=True,
            disable_log_stats=True,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enable_prefix_caching=True,
        )
    )
    rng = np.random.default_rng(args.seed)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    results = []
    try:
        warm = [rng.integers(10, vocab, size=args.input_tokens).tolist() for _ in range(4)]
        await _run_level(engine, warm, 8, 4)
        for c in [int(x) for x in args.concurrency.split(",")]:
            n = max(args.requests, c) if c > 1 else max(4, args.requests // 8)
            lengths = rng.integers(args.input_tokens - args.input_spread, args.input_tokens + args.input_spread + 1, size=n)
            prompts = [rng.integers(10, vocab, size=int(k)).tolist() for k in lengths]
            result = await _run_level(engine, prompts, args.output_tokens, c)
            results.append(result)
            sys.stderr.write(json.dumps(result) + "\n")
    finally:
        engine.shutdown()
    return results


def main(argv: list[str] | None = None) -> int:
    """CLI: run the in-process anchor and write its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=2560)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--concurrency", default="1,16,32,64")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-tokens", type=int, default=512)
    parser.add_argument("--input-spread", type=int, default=32)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    results = asyncio.run(_main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engine": "vllm AsyncLLM in-process", "levels": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
