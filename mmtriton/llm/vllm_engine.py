"""vLLM behind the ``tensorrt_llm`` contract: the same interface as :class:`mmtriton.llm.generation.LLMEngine`.

The python model of ``tensorrt_llm`` drives either engine the same way (``submit``,
``stream``, ``cancel`` and the statistics); this one runs vLLM's ``AsyncLLM`` on an
event loop of its own thread and bridges each request's outputs to a queue the
model's worker threads read.

What it adds on top of vLLM, to keep TensorRT-LLM's semantics:

- **Prompts.** Text-only requests go in as token ids; requests with fake ids
  ``vocab_size + i`` go in as ``prompt_embeds`` built on the GPU from the model's
  input embedding and the request's prompt table (:mod:`mmtriton.llm.vllm_prompts`).
  The embedding weight is read once from the checkpoint's safetensors.
- **Sampling.** TensorRT-LLM's defaults are greedy (``top_k`` and ``top_p`` unset);
  ``seed`` is honoured per request.
- **Ends.** ``end_id`` ends generation and is not returned; a negative ``end_id``
  (``ignore_eos``) runs to ``max_new_tokens``; multi-token ``stop_words_list``
  entries end generation after the match, which is kept (:class:`OutputFilter`).
- **Cancellation.** ``cancel`` (a closed stream, ``stop``) aborts the vLLM request.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtriton.llm.generation import (
    CONTRACT_SAMPLING_NAMES,
    STREAM_END,
    EngineError,
    GenerationRequest,
    check_sampling_values,
    token_stream,
)
from mmtriton.llm.vllm_stats import VllmBatchStats

LOGGER = logging.getLogger(__name__)


def sampling_kwargs(request: GenerationRequest, model_eos_ids: Sequence[int]) -> dict[str, Any]:
    """``vllm.SamplingParams`` keyword arguments for one contract request.

    Args:
        request: The request in TensorRT-LLM terms.
        model_eos_ids: The model's own end-of-sequence ids (generation config).

    Returns:
        Keyword arguments; ``output_kind`` and ``detokenize`` are set by the engine.
    """
    greedy = request.is_greedy()
    kwargs: dict[str, Any] = {
        "max_tokens": int(request.max_new_tokens),
        "temperature": 0.0 if greedy else float(request.temperature),
        "top_k": 0 if greedy or request.top_k <= 0 else int(request.top_k),
        "top_p": 1.0 if greedy or request.top_p <= 0 else float(request.top_p),
        "seed": None if request.seed is None else int(request.seed),
    }
    if request.end_id is not None and request.end_id < 0:
        kwargs["ignore_eos"] = True  # fixed-length answers (benchmarks)
    else:
        ends = sorted({int(request.end_id)} if request.end_id is not None else set(model_eos_ids))
        kwargs["stop_token_ids"] = ends
    return kwargs


def engine_settings(params: dict[str, str], max_batch_size: int) -> dict[str, Any]:
    """vLLM's engine settings from the ``tensorrt_llm`` model's rendered parameters.

    The one place they are read, for the served model and for the benchmark's
    in-process anchor (``bench.vllm_inprocess``), so both run the same configuration.

    Args:
        params: The model's ``config.pbtxt`` parameters (``name -> string_value``).
        max_batch_size: The model's ``max_batch_size`` (vLLM's ``max_num_seqs``).

    Returns:
        ``AsyncEngineArgs`` keywords: ``max_num_seqs``, ``max_model_len``,
        ``tensor_parallel_size``, ``gpu_memory_utilization``, ``enforce_eager``,
        ``enable_prefix_caching``.
    """
    return {
        "max_num_seqs": max_batch_size,
        "max_model_len": int(params["max_model_len"]),
        "tensor_parallel_size": int(params["tensor_parallel_size"]),
        "gpu_memory_utilization": float(params["gpu_memory_utilization"]),
        "enforce_eager": params["enforce_eager"] == "true",
        "enable_prefix_caching": params["enable_prefix_caching"] == "true",
    }


def async_engine_args(model_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords of a contract engine: ids in, ids out, prompt embeddings on.

    Args:
        model_dir: The Hugging Face checkpoint.
        settings: :func:`engine_settings`.
    """
    return {
        "model": str(model_dir),
        "skip_tokenizer_init": True,  # ids in, ids out: the contract's postprocessing detokenizes
        "enable_prompt_embeds": True,
        "disable_log_stats": True,  # vLLM's own periodic log stays off
        **settings,
    }


@dataclass
class OutputFilter:
    """Turns vLLM's token deltas into what the contract returns.

    An end id is not returned (vLLM keeps a stop token in its output); the first
    stop word generated ends the answer and is kept, as TensorRT-LLM does.

    Attributes:
        end_ids: Ids that end generation and are dropped.
        stop_words: Token sequences that end generation after the match.
    """

    end_ids: frozenset[int]
    stop_words: list[list[int]] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    done: bool = False

    def push(self, delta: Sequence[int]) -> list[int]:
        """New tokens from the engine -> tokens to send; sets :attr:`done` at an end."""
        emit: list[int] = []
        for token in delta:
            if self.done:
                break
            if token in self.end_ids:
                self.done = True
                break
            emit.append(int(token))
            self.output.append(int(token))
            if any(len(self.output) >= len(w) and self.output[-len(w) :] == w for w in self.stop_words if w):
                self.done = True
        return emit


@dataclass
class _Record:
    items: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    task: Any = None
    done: bool = False


class VllmEngine:
    """vLLM ``AsyncLLM`` with the contract's semantics; the interface of :class:`mmtriton.llm.generation.LLMEngine`.

    Args:
        model_dir: Hugging Face checkpoint folder (the bundle's ``llm/``).
        vocab_size: Ids at or above this are prompt-table rows.
        settings: vLLM's engine settings (:func:`engine_settings`): batch (``max_num_seqs``),
            model length, tensor parallel size, GPU memory share, CUDA graphs, prefix caching.
    """

    def __init__(self, model_dir: Path, *, vocab_size: int, settings: dict[str, Any]) -> None:
        self.model_dir = Path(model_dir)
        self.vocab_size = vocab_size
        self.max_batch_size = int(settings["max_num_seqs"])
        self.settings = dict(settings)
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._cancelled = 0
        self._batch_stats = VllmBatchStats()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True)
        self._engine: Any = None
        self._weight: Any = None
        self._eos: frozenset[int] = frozenset()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the embedding weight, start the event loop and the vLLM engine (blocks until ready)."""
        # flashinfer from PyPI compiles its sampler at run time; without nvcc that fails.
        os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        self._weight = load_input_embedding(self.model_dir)
        self._eos = frozenset(_model_eos_ids(self.model_dir))
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._create(), self._loop).result()

    async def _create(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            **async_engine_args(self.model_dir, self.settings),
            # Each step's batch (prefill chunks included) in SchedulerStats.iteration_details, for
            # the stat logger below (which turns the engine's statistics on).
            enable_logging_iteration_details=True,
        )
        self._engine = AsyncLLM.from_engine_args(args, stat_loggers=[self._batch_stats])

    def stop(self, timeout: float | None = 30.0) -> None:
        """Abort what runs, shut vLLM down and end the loop thread."""
        with self._lock:
            ids = list(self._records)
        for request_id in ids:
            self.cancel(request_id)
        if self._engine is not None:
            self._engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest) -> str:
        """Validate and start a request; returns its id for :meth:`stream` and :meth:`cancel`.

        Raises:
            ValueError: Bad ids, prompt table or sampling values (the message names the input and the limit).
        """
        from mmtriton.llm.vllm_prompts import ContractRequest, build_prompts

        check_sampling_values(request.temperature, request.top_k, request.top_p, names=CONTRACT_SAMPLING_NAMES)
        request_id = f"vllm-{next(self._ids)}"
        (prompt,) = build_prompts(
            [ContractRequest(request_id, request.input_ids, request.prompt_table)], self.vocab_size, self._weight
        )
        kwargs = sampling_kwargs(request, sorted(self._eos))
        # The ids vLLM stops on are the ones the contract does not return.
        flt = OutputFilter(frozenset(kwargs.get("stop_token_ids", ())), [list(w) for w in request.stop_words])
        record = _Record()
        with self._lock:
            self._records[request_id] = record
        record.task = asyncio.run_coroutine_threadsafe(self._run(request_id, prompt, kwargs, flt, record), self._loop)
        return request_id

    async def _run(self, request_id: str, prompt: dict, kwargs: dict, flt: OutputFilter, record: _Record) -> None:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(**kwargs, output_kind=RequestOutputKind.DELTA, detokenize=False)
        try:
            async for out in self._engine.generate(prompt, params, request_id):
                emit = flt.push(out.outputs[0].token_ids)
                if emit:
                    record.items.put(emit)
                if flt.done:
                    if not out.finished:
                        await self._engine.abort(request_id)
                    break
            record.items.put(STREAM_END)
        except asyncio.CancelledError:
            await self._engine.abort(request_id)
            record.items.put(STREAM_END)
        except Exception as err:  # noqa: BLE001 - any engine failure ends this request with an error
            LOGGER.exception("vLLM request %s failed", request_id)
            record.items.put(EngineError(str(err)))
        finally:
            record.done = True

    def stream(self, request_id: str, min_gap: Callable[[], float] | None = None) -> Iterator[list[int]]:
        """Yield a request's new tokens; closing the iterator early cancels the request.

        Args:
            request_id: Id returned by :meth:`submit`.
            min_gap: Seconds between chunks (see :func:`mmtriton.llm.generation.token_stream`).

        Raises:
            KeyError: Unknown request id.
            EngineError: The request failed in vLLM.
        """
        with self._lock:
            record = self._records.get(request_id)
            if record is None:
                raise KeyError(f"unknown request id {request_id!r}")
        return self._stream(request_id, record, min_gap)

    def _stream(self, request_id: str, record: _Record, min_gap: Callable[[], float] | None) -> Iterator[list[int]]:
        ended: list[bool] = []
        try:
            yield from token_stream(record.items, record.items.get, ended, min_gap)
        finally:
            if not ended:
                self.cancel(request_id)
            with self._lock:
                self._records.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        """Abort a running request (its stream ends); unknown or finished ones are ignored."""
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.done:
                return
            self._cancelled += 1
        if record.task is not None:
            record.task.cancel()

    # ------------------------------------------------------------------ statistics

    def step_batch_sizes(self) -> dict[int, int]:
        """Sequences in an engine step -> number of steps (vLLM's scheduler statistics)."""
        return self._batch_stats.step_batch_sizes()

    @property
    def max_batch_size_seen(self) -> int:
        """The most sequences vLLM ran in one engine step."""
        return self._batch_stats.max_batch_size_seen

    @property
    def num_in_flight(self) -> int:
        """Requests handed to vLLM and not finished."""
        with self._lock:
            return sum(1 for r in self._records.values() if not r.done)

    @property
    def num_pending(self) -> int:
        """Requests waiting in vLLM's scheduler after its latest step (no batch slot yet)."""
        return self._batch_stats.num_waiting

    @property
    def num_cancelled(self) -> int:
        """Requests cancelled since the engine started."""
        with self._lock:
            return self._cancelled


def load_input_embedding(model_dir: Path) -> Any:
    """The checkpoint's input embedding on the GPU, in the checkpoint's dtype."""
    import torch
    from safetensors import safe_open

    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = [k for k in f.keys() if k.endswith("embed_tokens.weight")]
            if names:
                return f.get_tensor(names[0]).to("cuda" if torch.cuda.is_available() else "cpu")
    raise EngineError(f"{model_dir}: no embed_tokens.weight in its safetensors files")


def _model_eos_ids(model_dir: Path) -> list[int]:
    import json

    config = Path(model_dir) / "generation_config.json"
    if not config.is_file():
        return []
    eos = json.loads(config.read_text()).get("eos_token_id")
    return [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])
