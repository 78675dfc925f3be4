"""The logic of the python ``tensorrt_llm`` model, apart from Triton's python backend API.

``model_repository/tensorrt_llm/1/model.py`` is a thin adapter: it reads tensors and sends
responses; what it decides lives here, where tests reach it without a server:

* :func:`make_engine`: the engine the rendered parameters name (transformers or vLLM);
* :func:`generation_request`: the contract's input tensors as a :class:`GenerationRequest`;
* :class:`StreamPacing`: the share of ``stream_chunk_rate`` each streaming request gets;
* :class:`RequestIds`: Triton request ids of running requests, for ``stop`` requests;
* :class:`EngineCounters`: what to add to the engine counters on ``/metrics`` since the last report.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmtriton.llm.generation import GenerationRequest, LLMEngine
from mmtriton.llm.prompting import parse_stop_words

#: The engines the ``engine`` parameter names.
ENGINES = ("transformers", "vllm")


def make_engine(params: dict[str, str], max_batch_size: int) -> LLMEngine:
    """The engine the model's rendered parameters describe (not started).

    Args:
        params: The ``parameters`` of the model's ``config.pbtxt`` (``engine`` is required).
        max_batch_size: The model's ``max_batch_size``: requests running at once.

    Raises:
        ValueError: ``engine`` is not one of :data:`ENGINES`.
    """
    engine = params["engine"]
    if engine not in ENGINES:
        raise ValueError(f"parameter 'engine' is {engine!r}; expected one of {', '.join(ENGINES)}")
    if engine == "vllm":
        from mmtriton.llm.vllm_engine import VllmEngine, engine_settings

        return VllmEngine(
            Path(params["gpt_model_path"]), vocab_size=int(params["vocab_size"]), settings=engine_settings(params, max_batch_size)
        )
    from mmtriton.llm.transformers_engine import Engine

    return Engine(
        Path(params["gpt_model_path"]),
        max_batch_size=max_batch_size,
        max_input_len=int(params["max_input_len"]),
        max_output_len=int(params["max_output_len"]),
        prompt_table_capacity=int(params["prompt_table_capacity"]),
        device=params["device"],
    )


def generation_request(tensor: Callable[[str], np.ndarray | None]) -> GenerationRequest:
    """A request's contract tensors as a :class:`GenerationRequest`.

    Args:
        tensor: Returns the named input as a numpy array, or None when it was not sent.
    """

    def scalar(name: str, default: Any = None) -> Any:
        value = tensor(name)
        return default if value is None else value.reshape(-1)[0].item()

    ids = tensor("input_ids")
    table = tensor("prompt_embedding_table")
    stop = tensor("stop_words_list")
    length = int(scalar("input_lengths"))
    return GenerationRequest(
        input_ids=[] if ids is None else ids.reshape(-1)[:length].tolist(),
        max_new_tokens=int(scalar("request_output_len")),
        end_id=scalar("end_id"),
        pad_id=scalar("pad_id"),
        temperature=float(scalar("temperature", 1.0)),
        top_k=int(scalar("runtime_top_k", 0)),
        top_p=float(scalar("runtime_top_p", 0.0)),
        seed=scalar("seed"),
        stop_words=[] if stop is None else parse_stop_words(stop.reshape(2, -1)),
        # A copy: a view would keep the stub's shared-memory input, and with it the whole
        # Triton request (and its ensemble), alive for as long as the engine holds it.
        prompt_table=None if table is None else np.array(table.reshape(-1, table.shape[-1]), copy=True),
        prompt_vocab_size=int(scalar("prompt_vocab_size", 0)),
    )


class StreamPacing:
    """``stream_chunk_rate`` responses per second, shared by the streaming requests of the moment.

    With ``n`` requests streaming, each sends a chunk at most every ``n / rate`` seconds
    (:func:`mmtriton.llm.generation.token_stream` gathers what arrives in between).

    Args:
        rate: Streamed responses per second over all requests; 0 turns pacing off (one
            response per engine step).
    """

    def __init__(self, rate: float) -> None:
        self.rate = float(rate)
        self.streaming = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether streams are paced at all."""
        return self.rate > 0

    def enter(self) -> None:
        """A paced stream starts."""
        with self._lock:
            self.streaming += 1

    def leave(self) -> None:
        """A paced stream ends."""
        with self._lock:
            self.streaming -= 1

    def gap(self) -> float:
        """Seconds between two chunks of one stream under the present load."""
        return self.streaming / self.rate


class RequestIds:
    """Which engine request a running Triton request id maps to (TensorRT-LLM's ``stop``)."""

    def __init__(self) -> None:
        self._by_triton_id: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, triton_id: str, engine_id: str) -> None:
        """Remember a running request (a request without an id cannot be stopped by id)."""
        if triton_id:
            with self._lock:
                self._by_triton_id[triton_id] = engine_id

    def engine_id(self, triton_id: str) -> str | None:
        """The engine request running under ``triton_id``, or None."""
        with self._lock:
            return self._by_triton_id.get(triton_id)

    def forget(self, triton_id: str, engine_id: str) -> None:
        """The request ended; a newer request that reused the Triton id keeps its entry."""
        with self._lock:
            if triton_id and self._by_triton_id.get(triton_id) == engine_id:
                del self._by_triton_id[triton_id]

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_triton_id)


class EngineCounters:
    """The engine's cumulative step figures as increments for Prometheus counters.

    The engine keeps totals (steps by batch size, cancelled requests); a counter on
    ``/metrics`` is incremented, so each report adds what changed since the last one.
    """

    def __init__(self) -> None:
        self._last = (0, 0, 0)

    def increments(self, engine: LLMEngine) -> tuple[int, int, int]:
        """``(steps, sequences over those steps, cancelled requests)`` since the last call."""
        hist = engine.step_batch_sizes()
        now = (sum(hist.values()), sum(size * count for size, count in hist.items()), engine.num_cancelled)
        delta = tuple(a - b for a, b in zip(now, self._last))
        self._last = now
        return delta  # type: ignore[return-value]
