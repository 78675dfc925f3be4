"""vLLM's own AsyncLLM in-process: the anchor the served gpu-vllm figures are compared with.

Both sides run the same engine and the same requests:

- **Engine settings** are read from the rendered gpu-vllm repository
  (``tensorrt_llm/config.pbtxt``: ``max_batch_size`` as ``max_num_seqs``,
  ``max_model_len``, tensor parallel size, GPU memory share, CUDA graphs, prefix caching).
- **Requests** are the benchmark's own workload (:class:`bench.workload.Workload`, same
  seed, same indices ``0..n-1`` at every level). Each prompt goes through the
  ``preprocessing`` model's :class:`mmtriton.llm.prompting.PromptBuilder` (chat template,
  placeholder expansion, fake ids), with prompt-table rows of the sizes the encoders
  produce (``vision.tokens_per_image`` rows per image, ``audio.tokens(frames)`` per
  clip; random values, since the values do not change the work). The vLLM prompt is
  made from them by :func:`mmtriton.llm.vllm_prompts.build_prompts` on the GPU at
  submission, as the served engine does: token ids for text-only requests,
  embeddings where media rows are.

So what the anchor leaves out is the serving path itself: media decoding, encoders,
the python backend, Triton's ensembles and gRPC. Figures per level: output tok/s,
requests/s, latency mean/P50/P99, TTFT mean/P99, ITL mean/P99 (pooled gaps, as
:mod:`bench.stats` defines them).

    python -m bench.vllm_inprocess --repo build/repo-9b-vllm --concurrency 16,32 --requests 64 \\
        --input-tokens 512 --input-spread 32 --output-tokens 256 --out results/vllm-inprocess.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import RequestTiming, summarize
from bench.workload import BenchSettings, Workload, load_tokenizer, max_prompt_tokens, workload_settings

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServedSetup:
    """What the anchor reads from a rendered gpu-vllm repository.

    Attributes:
        model_dir: The LLM checkpoint (``gpt_model_path``).
        engine_args: vLLM ``AsyncEngineArgs`` keywords, as the served engine sets them.
        vocab_size: Ids at or above this are prompt-table rows.
        preprocessing: The ``preprocessing`` model's parameters (tokenizer, tokens, limits).
        spec: The bundle's model spec (encoder output sizes).
    """

    model_dir: Path
    engine_args: dict[str, Any]
    vocab_size: int
    preprocessing: dict[str, str]
    spec: Any


def read_setup(repo: Path) -> ServedSetup:
    """Read engine settings and prompt construction from a rendered gpu-vllm repository.

    Raises:
        ValueError: The repository's ``tensorrt_llm`` does not run vLLM.
    """
    from mmtriton.spec import spec_from_dict
    from mmtriton.serving.triton_config import parse_model_config
    from mmtriton.llm.vllm_engine import engine_settings

    def params(model: str) -> tuple[Any, dict[str, str]]:
        config = parse_model_config((repo / model / "config.pbtxt").read_text(), model)
        return config, {k: v.string_value for k, v in config.parameters.items()}

    llm, llm_params = params("tensorrt_llm")
    if llm_params.get("engine") != "vllm":
        raise ValueError(f"{repo}: tensorrt_llm runs {llm_params.get('engine')!r}, not vllm (render --profile gpu-vllm)")
    _, pre_params = params("preprocessing")
    model_dir = Path(llm_params["gpt_model_path"])
    bundle = json.loads((model_dir.parent / "bundle.json").read_text())
    engine_args = engine_settings(llm_params, int(llm.max_batch_size))
    return ServedSetup(model_dir, engine_args, int(llm_params["vocab_size"]), pre_params, spec_from_dict(bundle["spec"]))


def _clip_samples(audio: bytes) -> int:
    """Samples of a clip at the audio preprocessing's rate (the workload's clips are 16 kHz WAVs)."""
    import soundfile

    with soundfile.SoundFile(io.BytesIO(audio)) as clip:
        return int(clip.frames)


class PromptMaker:
    """Workload requests -> the contract tensors the served ``tensorrt_llm`` step receives.

    Args:
        setup: The repository's setup.
        seed: Seed of the random prompt-table rows.
    """

    def __init__(self, setup: ServedSetup, seed: int = 0) -> None:
        from mmtriton.llm.prompting import PromptBuilder

        self.builder = PromptBuilder.from_parameters(setup.preprocessing)
        self.spec = setup.spec
        self.hidden = self.builder.hidden_size
        self.rng = np.random.default_rng(seed)

    def _rows(self, n: int) -> np.ndarray:
        return (self.rng.standard_normal((n, self.hidden), dtype=np.float32) * 0.02).astype(np.float16)

    def contract(self, request: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """``input_ids`` and ``prompt_embedding_table`` for one :class:`bench.workload.PlannedRequest`."""
        image = self._rows(self.spec.vision.tokens_per_image) if request.image is not None else None
        audio = None
        if request.audio is not None:
            audio = self._rows(self.spec.audio.tokens(self.spec.audio.frames(_clip_samples(request.audio))))
        prompt = self.builder.build(request.prompt, image, audio)
        return prompt.input_ids, prompt.prompt_table


async def _run_level(
    engine: Any, contracts: list[tuple[np.ndarray, np.ndarray | None]], setup: ServedSetup, weight: Any,
    output_tokens: int, concurrency: int,
) -> dict[str, Any]:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    from mmtriton.llm.vllm_prompts import ContractRequest, build_prompts

    params = SamplingParams(
        max_tokens=output_tokens, ignore_eos=True, temperature=0.0, detokenize=False, output_kind=RequestOutputKind.DELTA
    )
    pending = list(enumerate(contracts))[::-1]
    timings: list[RequestTiming] = []
    rows = 0

    async def worker() -> None:
        nonlocal rows
        while pending:
            index, (ids, table) = pending.pop()
            request_id = f"c{concurrency}-{index}"
            send = time.perf_counter()
            # Built at submission on the GPU, as VllmEngine.submit does.
            (prompt,) = build_prompts([ContractRequest(request_id, ids, table)], setup.vocab_size, weight)
            rows += 0 if table is None else int(table.shape[0])
            times: list[float] = []
            async for out in engine.generate(prompt, params, request_id):
                times += [time.perf_counter()] * len(out.outputs[0].token_ids)
            timings.append(
                RequestTiming(send_s=send, end_s=time.perf_counter(), token_times_s=times, output_tokens=len(times))
            )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    stats = summarize(timings)
    return {"concurrency": concurrency, "media_rows": rows, **stats.to_dict()}


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from mmtriton.llm.vllm_engine import async_engine_args, load_input_embedding

    setup = read_setup(args.repo)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    requests = [int(n) for n in args.requests.split(",")]
    if len(requests) == 1:
        requests *= len(concurrency)
    if len(requests) != len(concurrency):
        raise ValueError("--requests: one count, or one per concurrency level")
    settings = BenchSettings(
        concurrency=concurrency,
        requests=max(requests),
        **workload_settings(args),
    )
    settings.validate()
    workload = Workload(
        load_tokenizer(setup.preprocessing["tokenizer_dir"]),
        settings,
        max_prompt_tokens(int(setup.preprocessing["max_input_len"]), settings.input_tokens),
    )
    maker = PromptMaker(setup, args.seed)
    weight = load_input_embedding(setup.model_dir)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**async_engine_args(setup.model_dir, setup.engine_args)))
    levels = []
    try:
        warm = [maker.contract(workload.request(-i - 1)) for i in range(args.warmup)]
        if warm:
            await _run_level(engine, warm, setup, weight, 8, min(4, len(warm)))
        for concurrency, count in zip(concurrency, requests):
            contracts = [maker.contract(workload.request(i)) for i in range(count)]
            level = await _run_level(engine, contracts, setup, weight, settings.output_tokens, concurrency)
            levels.append(level)
            LOGGER.info(
                "in-process c=%d: %.1f tok/s, P99 %.3f s, TTFT %.0f ms, ITL %.2f ms",
                concurrency, level["output_tokens_per_s"], level["latency_p99_s"], level["ttft_avg_s"] * 1e3,
                level["itl_avg_s"] * 1e3,
            )
    finally:
        engine.shutdown()
    import vllm

    return {
        "engine": "vLLM AsyncLLM in-process",
        "vllm": vllm.__version__,
        "engine_args": setup.engine_args,
        "workload": {**settings.__dict__, "requests": requests},
        "levels": levels,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: run the in-process anchor and write its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="rendered gpu-vllm repository (engine settings)")
    parser.add_argument("--concurrency", default="1,16,32,64")
    parser.add_argument(
        "--requests", default="64", help="requests per level (indices 0..n-1, as bench): one count or one per level"
    )
    parser.add_argument("--input-tokens", type=int, default=512)
    parser.add_argument("--input-spread", type=float, default=32.0)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--image-share", type=float, default=0.25)
    parser.add_argument("--audio-share", type=float, default=0.25)
    parser.add_argument("--audio-seconds", type=float, help="every clip this long (default: bench's 2-4 s mix)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    result = asyncio.run(_main(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
