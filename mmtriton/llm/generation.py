"""Engine-neutral pieces of the LLM step: the request and its checks, paced streaming, the interface.

Both engines behind the ``tensorrt_llm`` contract, transformers' continuous batching
(:mod:`mmtriton.llm.transformers_engine`, the cpu and gpu-hf profiles) and vLLM
(:mod:`mmtriton.llm.vllm_engine`), take a :class:`GenerationRequest` and implement
:class:`LLMEngine`, which is all the contract model (``tensorrt_llm/1/model.py``) uses.
"""

from __future__ import annotations

import math
import queue
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from mmtriton.contract import InputError

STREAM_END = object()  # put after a request's last tokens


def coalesce(first: Sequence[int], items: queue.SimpleQueue) -> tuple[list[int], object | None]:
    """``first`` plus every token list already waiting in ``items``, as one chunk.

    Tokens of steps the consumer has not taken yet go out together, so a consumer
    slower than the engine (per-token responses through Triton) sends fewer, larger
    chunks instead of falling further behind.

    Returns:
        The tokens, and the first non-token item met (the end marker or an error),
        or None; the caller handles that item after yielding the tokens.
    """
    tokens = list(first)
    return tokens, _gather(tokens, items)


def token_stream(
    items: queue.SimpleQueue,
    wait: Callable[[], object],
    ended: list[bool],
    min_gap: Callable[[], float] | None = None,
) -> Iterator[list[int]]:
    """Yield a request's tokens from its queue, coalesced (:func:`coalesce`), until it ends.

    Shared by both engines' ``stream``. The queue holds token lists, then
    :data:`STREAM_END` or the exception that ended the request.

    With ``min_gap``, consecutive chunks are at least ``min_gap()`` seconds apart:
    tokens that arrive within the gap join the next chunk. The first chunk goes out
    at once (time to first token is not delayed) and so do the last tokens when the
    request ends inside a gap. This bounds the responses per second that go through
    Triton (each one an IPC message, an ensemble step and a ``postprocessing``
    request) when many requests stream at once.

    Args:
        items: The request's queue.
        wait: Blocks for the next item (an engine may raise from it when it stops).
        ended: Gets an entry when the request ended by itself (end or error), so the
            caller knows that a stream closed without one was abandoned.
        min_gap: Seconds between chunks, asked before each chunk; None or ``<= 0``:
            every chunk goes out as soon as the consumer takes it.

    Raises:
        BaseException: The exception that ended the request.
    """
    held: object = None  # an end or error found while coalescing, handled after the tokens
    last_sent: float | None = None
    while True:
        item, held = (held, None) if held is not None else (wait(), None)
        if item is STREAM_END:
            ended.append(True)
            return
        if isinstance(item, BaseException):
            ended.append(True)
            raise item
        tokens, held = coalesce(item, items)
        gap = min_gap() if (min_gap is not None and last_sent is not None) else 0.0
        if gap > 0 and held is None:
            held = _gather(tokens, items, last_sent + gap)
        yield tokens
        last_sent = time.monotonic()


def _gather(tokens: list[int], items: queue.SimpleQueue, deadline: float | None = None) -> object | None:
    """Append the token lists in ``items`` to ``tokens``: those waiting now, or (with a
    ``deadline``, a ``time.monotonic()`` value) also those that arrive before it.

    Returns:
        The first non-token item (end marker or error), which ends the gathering, or None.
    """
    while True:
        try:
            if deadline is None:
                more = items.get_nowait()
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                more = items.get(timeout=left)
        except queue.Empty:
            return None
        if not isinstance(more, list):
            return more
        tokens.extend(more)


class EngineError(RuntimeError):
    """A request failed inside the engine (generation error, or the engine stopped)."""


@dataclass
class GenerationRequest:
    """One generation request, in TensorRT-LLM terms.

    Attributes:
        input_ids: Prompt token ids. Ids ``vocab_size + i`` select row ``i`` of
            ``prompt_table``.
        max_new_tokens: Maximum number of tokens to generate (1..max_output_len).
        end_id: Stop token, not included in the output. None: the model's EOS id(s);
            negative: never stop on a token.
        pad_id: Accepted for compatibility; unused.
        temperature: Sampling temperature; ``<= 0`` means greedy.
        top_k: Top-k limit; ``1`` means greedy, ``<= 0`` unset.
        top_p: Nucleus limit in (0, 1]; ``<= 0`` unset. ``top_k <= 0 and top_p <= 0``
            means greedy.
        seed: Sampling seed (vLLM honours it; the transformers engine refuses it for a
            sampled request).
        stop_words: Token sequences; generation ends after the first one generated,
            which is kept in the output.
        prompt_table: Float16 ``[rows, hidden]`` prompt embedding table, or None.
        prompt_vocab_size: Rows of ``prompt_table`` the fake ids may address; 0 means
            all rows.
    """

    input_ids: list[int]
    max_new_tokens: int
    end_id: int | None = None
    pad_id: int | None = None
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    seed: int | None = None
    stop_words: list[list[int]] = field(default_factory=list)
    prompt_table: np.ndarray | None = None
    prompt_vocab_size: int = 0

    def is_greedy(self) -> bool:
        """Whether this request decodes greedily (``temperature <= 0``, ``top_k == 1``, or neither top-k nor top-p set)."""
        return self.temperature <= 0 or self.top_k == 1 or (self.top_k <= 0 and self.top_p <= 0)


#: The sampling inputs' names in the TensorRT-LLM contract (what a client of ``tensorrt_llm`` sends).
CONTRACT_SAMPLING_NAMES = ("temperature", "runtime_top_k", "runtime_top_p")


def check_sampling_values(
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    *,
    names: tuple[str, str, str] = ("temperature", "top_k", "top_p"),
) -> None:
    """The one definition of the sampling values an engine accepts (None: not given).

    Greedy is ``temperature`` 0, ``top_k`` 1, or neither top-k nor top-p (both 0), as in
    TensorRT-LLM's contract; there is no upper bound on ``temperature`` here (the OpenAI
    front door applies OpenAI's 0..2 itself).

    Args:
        temperature: Must be finite and >= 0.
        top_k: Must be >= 0 (0: no top-k filtering).
        top_p: Must be within [0, 1] (0: no top-p filtering).
        names: The inputs to name in the error (the chat ensembles' or the contract's).

    Raises:
        InputError: A value outside its range, naming the input.
    """
    if temperature is not None and (not math.isfinite(temperature) or temperature < 0):
        raise InputError(names[0], f"{temperature} must be a finite number >= 0")
    if top_k is not None and top_k < 0:
        raise InputError(names[1], f"{top_k} must be >= 0 (0 = no top-k filtering)")
    if top_p is not None and (not math.isfinite(top_p) or top_p < 0 or top_p > 1):
        raise InputError(names[2], f"{top_p} must be within [0, 1] (0 = no top-p filtering)")


def check_request(
    request: GenerationRequest,
    *,
    vocab_size: int,
    hidden_size: int,
    max_input_len: int,
    max_output_len: int,
    prompt_table_capacity: int,
) -> tuple[list[int], np.ndarray | None]:
    """Check a request against the engine's limits, normalizing its ids and stop words in place.

    Args:
        request: The request (its ``input_ids`` become a list of ints, its ``stop_words``
            lists of ints).
        vocab_size: Fake ids start here.
        hidden_size: The prompt table's width.
        max_input_len: Longest prompt.
        max_output_len: Largest ``max_new_tokens``.
        prompt_table_capacity: Table rows the engine can hold for one request.

    Returns:
        The distinct fake-id indices the prompt uses, and those rows of its table (None
        when it uses none).

    Raises:
        ValueError: The request is invalid; the message names the problem.
    """
    ids = request.input_ids
    if isinstance(ids, np.ndarray):
        ids = ids.reshape(-1).tolist()
    try:
        ids = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"input_ids must be a sequence of integers: {exc}") from None
    request.input_ids = ids
    if not ids:
        raise ValueError("input_ids is empty")
    if len(ids) > max_input_len:
        raise ValueError(f"input_ids has {len(ids)} tokens, more than max_input_len {max_input_len}")
    if min(ids) < 0:
        raise ValueError(f"input_ids contains a negative id {min(ids)}")
    if not 1 <= request.max_new_tokens <= max_output_len:
        raise ValueError(f"max_new_tokens {request.max_new_tokens} is outside [1, {max_output_len}]")
    # The contract's own names: a client of tensorrt_llm itself sends these.
    check_sampling_values(request.temperature, request.top_k, request.top_p, names=CONTRACT_SAMPLING_NAMES)
    stop_words = []
    for word in request.stop_words or []:
        word = [int(t) for t in word]
        if not word:
            raise ValueError("stop_words contains an empty sequence")
        stop_words.append(word)
    request.stop_words = stop_words

    fake = sorted({i - vocab_size for i in ids if i >= vocab_size})
    table = request.prompt_table
    if table is None:
        if fake:
            raise ValueError(
                f"input_ids contains fake id {fake[0] + vocab_size} (>= vocab_size {vocab_size}) "
                "but no prompt_table was given"
            )
        if request.prompt_vocab_size:
            raise ValueError("prompt_vocab_size is set but no prompt_table was given")
        return [], None
    table = np.asarray(table)
    if table.ndim == 3 and table.shape[0] == 1:
        table = table[0]
    if table.ndim != 2 or table.shape[1] != hidden_size:
        raise ValueError(
            f"prompt_table must have shape [rows, {hidden_size}] (the LLM hidden size), got {table.shape}"
        )
    if not np.issubdtype(table.dtype, np.floating):
        raise ValueError(f"prompt_table must be floating point (float16), got {table.dtype}")
    rows = table.shape[0]
    usable = request.prompt_vocab_size or rows
    if not 0 <= request.prompt_vocab_size <= rows:
        raise ValueError(f"prompt_vocab_size {request.prompt_vocab_size} is outside [0, {rows}] (table rows)")
    if fake and fake[-1] >= usable:
        raise ValueError(
            f"fake id {fake[-1] + vocab_size} is out of range: the prompt table serves ids "
            f"[{vocab_size}, {vocab_size + usable})"
        )
    if len(fake) > prompt_table_capacity:
        raise ValueError(
            f"request references {len(fake)} prompt-table rows but the engine's prompt_table_capacity is "
            f"{prompt_table_capacity}; it can never fit"
        )
    if not fake:
        return [], None
    return fake, np.ascontiguousarray(table[fake])


class LLMEngine(Protocol):
    """What the ``tensorrt_llm`` contract model needs of an engine; both engines implement it."""

    def start(self) -> None:
        """Load the model and start generating."""

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop generating; pending and running requests end with an :class:`EngineError`."""

    def submit(self, request: GenerationRequest) -> str:
        """Check and enqueue a request (``ValueError`` when invalid); return its id."""

    def stream(self, request_id: str, min_gap: Callable[[], float] | None = None) -> Iterator[list[int]]:
        """The request's new tokens as they come, paced by ``min_gap`` (see :func:`token_stream`)."""

    def cancel(self, request_id: str) -> None:
        """End a request early and free its slot."""

    def step_batch_sizes(self) -> dict[int, int]:
        """Engine steps by the number of sequences they ran."""

    @property
    def max_batch_size_seen(self) -> int:
        """The largest step batch so far."""

    @property
    def num_in_flight(self) -> int:
        """Requests running now."""

    @property
    def num_pending(self) -> int:
        """Requests accepted and waiting for a slot."""

    @property
    def num_cancelled(self) -> int:
        """Requests ended early so far."""
