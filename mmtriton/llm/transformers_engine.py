"""In-flight (continuous) batching engine over a Hugging Face causal LM, with prompt tables.

This is the CPU-profile (and CUDA-capable) stand-in for the TensorRT-LLM engine: a
python-backend Triton model wraps :class:`Engine`. Scheduling, the paged KV cache,
chunked prefill and per-step batching are transformers' own continuous batching
(``model.init_continuous_batching`` -> ``ContinuousBatchingManager``, transformers
5.24); this module adds what it lacks:

* **Prompt tables** (TensorRT-LLM "p-tuning" style multimodal input). A request's
  ``input_ids`` may hold fake ids ``vocab_size + i`` that select row ``i`` of its own
  ``prompt_embedding_table``. A packed continuous batch cannot carry a per-request
  table, so the decoder's input embedding is replaced by :class:`PromptTableEmbedding`,
  which embeds ids ``< vocab_size`` normally and maps ids ``>= vocab_size`` to rows
  of ONE ``[prompt_table_capacity, hidden]`` table owned by the engine. On admission
  the rows a request references are copied into free rows of that table and its fake
  ids are rewritten to *virtual ids* ``vocab_size + tag * capacity + row`` (the
  embedding uses ``(id - vocab_size) % capacity``). The per-admission ``tag`` keeps
  virtual ids unique across row reuse, so transformers' prefix cache (keyed by token
  ids) never serves KV computed from another request's table; tags wrap after
  ``(2**31 - 1 - vocab_size) // capacity`` table admissions. Rows are freed when the
  request finishes, is cancelled or fails. A request that needs more rows than are
  free waits (FIFO among table requests; text-only requests may pass it); one that
  can never fit is rejected by :meth:`Engine.submit`.
* **Admission control**: at most ``max_batch_size`` requests are in flight (handed
  to transformers); the rest wait in the engine's queue, like TensorRT-LLM's
  ``max_batch_size``. transformers' ``max_requests_per_batch`` is set to the same
  value, so no forward step ever holds more than ``max_batch_size`` sequences.
* **Stop words** (transformers CB has no stop sequences): checked on the generated
  tokens as they stream in. When the generated tokens end with one of
  ``stop_words``, generation ends *after* the match and the stop sequence is kept in
  the output (TensorRT-LLM behaviour); the request is then cancelled in
  transformers. Only generated tokens are matched (a match straddling the prompt and
  the output does not count).
* **End id**: generation stops when ``end_id`` is generated and, like TensorRT-LLM,
  the end id itself is *not* returned. ``end_id=None`` uses the model's
  ``generation_config.eos_token_id`` (all of them, if a list); a negative ``end_id``
  disables EOS stopping (fixed-length generation of ``max_new_tokens``).
* **Per-step batch statistics** (:meth:`Engine.step_batch_sizes`,
  :attr:`Engine.max_batch_size_seen`): the number of sequences that produced a token
  in each forward step, recorded from transformers' per-step output delivery.

Sampling (per request, via transformers' per-request logits processors
``ContinuousBatchingConfig(per_request_processors=True)`` with ``temperature``,
``top_k`` and ``top_p`` request kwargs). The manager always samples
(``do_sample=True``); greedy requests (:meth:`GenerationRequest.is_greedy`) are sent as
``top_k=1``, which leaves one finite logit, so the draw is the argmax. Otherwise
temperature, then top-k and top-p (``<= 0``: no limit) are applied.

KV cache: pages of 256 tokens with transformers' prefix caching on. On CPU the cache
is sized for the worst case (``max_batch_size + 1`` requests of
``max_input_len + max_output_len`` tokens); on accelerators transformers sizes it from
free device memory and queues prefills while it is full. A forward step processes at
most ``min(8192, max_input_len + max_batch_size)`` tokens; prefills beyond the step's
budget are chunked.

Limitations (transformers 5.24 CB):

* ``seed`` cannot be honoured per request: sampling draws from the process-wide torch
  generator, which transformers re-seeds (``torch.manual_seed``) when the generation
  loop starts. A sampled request that gives a seed is therefore refused (an
  ``input 'seed'`` error) rather than answered without it; a greedy one is exact and
  its seed is moot.
* Greedy via ``top_k=1`` keeps *all* tokens tied for the maximum logit, so on an exact
  tie the choice is random where ``argmax`` would take the lowest id.
* ``pad_id`` is accepted for contract compatibility and ignored (no padding exists in
  a packed batch).
* No beam search, logprobs, repetition/presence penalties, bad words or min tokens.
* Every submitted request must be streamed to its end or cancelled; its record is
  dropped then. Closing a stream early cancels the request.
* Outputs are taken from transformers by replacing the manager's ``output_router``
  (an internal attribute, stable in 5.24) with one that routes each step's outputs
  straight to the engine; that is also where per-step batch sizes are counted.
  Sequences that only ran a prefill chunk in a step (no token yet) are not counted.
* On cancel, the slot and rows are released at once, while transformers drops the
  request at its next step; a forward already running may still read those rows for
  the cancelled request, whose output is discarded (virtual ids keep its KV from
  ever being reused).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager, OutputRouter
from transformers.generation.continuous_batching.requests import GenerationOutput, RequestStatus
from transformers.generation.continuous_batching.utils import WorkloadHints

from mmtriton.llm.generation import STREAM_END, EngineError, GenerationRequest, check_request, token_stream
from mmtriton.llm.prompt_table import PromptTableEmbedding

logger = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1
@dataclass(eq=False)
class _Record:
    """Engine-side state of one request."""

    request_id: str
    request: GenerationRequest
    eos_ids: frozenset[int]
    fake_ids: list[int]  # distinct prompt-table indices the prompt references, sorted
    table_rows: torch.Tensor | None  # their embeddings, model dtype, on the device
    sampling: dict[str, float | int]
    rows: list[int] = field(default_factory=list)  # shared-table rows held while admitted
    admitted: bool = False
    done: bool = False
    seen: int = 0  # tokens of transformers' cumulative output already processed
    output: list[int] = field(default_factory=list)  # tokens streamed so far
    stream_taken: bool = False
    items: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)


class _Router(OutputRouter):
    """Routes transformers' per-step outputs straight into the engine (no shared queue)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

    def deliver(self, output: GenerationOutput) -> None:
        self._engine._on_outputs([output], step=False)

    def deliver_batch(self, outputs: list[GenerationOutput]) -> None:
        self._engine._on_outputs(outputs, step=True)


class Engine:
    """Continuous-batching generation engine with per-request prompt tables.

    Args:
        model_dir: Hugging Face causal-LM directory (config, weights).
        max_batch_size: Most requests in flight at once (and per forward step).
        max_input_len: Longest accepted prompt, in tokens.
        max_output_len: Largest accepted ``max_new_tokens``.
        prompt_table_capacity: Rows of the shared prompt table (0 disables tables).
        device: Torch device, e.g. ``"cpu"`` or ``"cuda:0"``.
        dtype: Model dtype; None keeps the checkpoint's.

    Raises:
        ValueError: A size argument is out of range.
    """

    def __init__(
        self,
        model_dir: Path,
        *,
        max_batch_size: int,
        max_input_len: int,
        max_output_len: int,
        prompt_table_capacity: int,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> None:
        if max_batch_size < 1 or max_input_len < 1 or max_output_len < 1 or prompt_table_capacity < 0:
            raise ValueError(
                f"invalid engine sizes: {max_batch_size=}, {max_input_len=}, {max_output_len=}, "
                f"{prompt_table_capacity=}"
            )
        self.max_batch_size = max_batch_size
        self.max_input_len = max_input_len
        self.max_output_len = max_output_len
        self.prompt_table_capacity = prompt_table_capacity
        self.device = torch.device(device)

        model = AutoModelForCausalLM.from_pretrained(Path(model_dir), dtype=dtype if dtype is not None else "auto")
        self.model = model.to(self.device).eval()
        self.dtype = self.model.dtype
        base = self.model.get_input_embeddings()
        # Fake ids start at the config's vocab_size (the contract's), even if the
        # embedding matrix is padded beyond it.
        text_config = self.model.config.get_text_config()
        self.vocab_size = int(getattr(text_config, "vocab_size", None) or base.weight.shape[0])
        if self.vocab_size > base.weight.shape[0]:
            raise ValueError(f"config vocab_size {self.vocab_size} exceeds the embedding's {base.weight.shape[0]} rows")
        self.hidden_size = int(base.weight.shape[1])
        self.embedding = PromptTableEmbedding(base, self.vocab_size, prompt_table_capacity)
        self.model.set_input_embeddings(self.embedding)
        self.default_eos_ids = self._model_eos_ids()

        max_pos = getattr(self.model.config, "max_position_embeddings", None)
        if max_pos is not None and max_input_len + max_output_len > max_pos:
            logger.warning(
                "max_input_len + max_output_len = %d exceeds the model's max_position_embeddings %d",
                max_input_len + max_output_len,
                max_pos,
            )
        self._tag_count = max(1, (_INT32_MAX - self.vocab_size) // max(prompt_table_capacity, 1))
        if prompt_table_capacity and self.vocab_size + prompt_table_capacity > _INT32_MAX:
            raise ValueError(f"prompt_table_capacity {prompt_table_capacity} does not fit int32 token ids")

        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._tags = itertools.count()
        self._records: dict[str, _Record] = {}
        self._pending: list[_Record] = []
        self._in_flight = 0
        self._cancelled = 0
        self._free_rows: set[int] = set(range(prompt_table_capacity))
        self._manager: ContinuousBatchingManager | None = None
        self._accepting = False
        self._step_hist: Counter[int] = Counter()
        self._max_seen = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background generation loop (idempotent).

        Raises:
            RuntimeError: transformers could not start continuous batching.
        """
        with self._lock:
            if self._manager is not None:
                return
        page_size = 256
        num_blocks = None  # accelerators: transformers sizes the KV cache from free memory
        if self.device.type == "cpu":
            # Worst case instead of a share of host RAM: every in-flight request (+1 for
            # one being cancelled) at full length, above the scheduler's 15 % safety
            # margin under which it stops admitting prefills.
            blocks_per_request = -(-(self.max_input_len + self.max_output_len) // page_size)
            num_blocks = -(-(self.max_batch_size + 1) * blocks_per_request * 100 // 85) + 1
        cb_config = ContinuousBatchingConfig(
            page_size=page_size,
            num_blocks=num_blocks,
            max_batch_tokens=min(8192, self.max_input_len + self.max_batch_size),
            max_requests_per_batch=self.max_batch_size,
            per_request_processors=True,
            allow_block_sharing=True,
        )
        # The manager-wide defaults only make transformers build the temperature /
        # top-k / top-p processors; every request overrides all three.
        gen_config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=self.vocab_size,
            top_p=0.5,
            max_new_tokens=self.max_output_len,
            eos_token_id=-1,
        )
        hints = WorkloadHints(
            max_prompt_length=self.max_input_len,
            max_generated_length=self.max_output_len,
            num_requests=self.max_batch_size,
        )
        manager = self.model.init_continuous_batching(
            generation_config=gen_config, continuous_batching_config=cb_config, workload_hints=hints
        )
        manager.output_router = _Router(self)  # before the batch processor is created (warmup / start)
        manager.warmup()  # no-op unless CUDA graphs / compile are enabled
        with torch.inference_mode():
            manager.start()
        with self._lock:
            self._manager = manager
            self._accepting = True
        logger.info(
            "engine started: device=%s dtype=%s max_batch_size=%d prompt_table_capacity=%d kv_blocks=%s",
            self.device,
            self.dtype,
            self.max_batch_size,
            self.prompt_table_capacity,
            num_blocks if num_blocks is not None else "auto",
        )

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the generation loop; unfinished requests end with :class:`EngineError`.

        Args:
            timeout: Seconds to wait for the loop thread.
        """
        with self._lock:
            manager, self._manager = self._manager, None
            self._accepting = False
        if manager is None:
            return
        manager.stop(block=True, timeout=timeout, hard_stop=True)
        manager.destroy()
        with self._lock:
            for record in list(self._records.values()):
                if not record.done:
                    self._finish(record, EngineError("engine stopped"), admit=False)
            self._pending.clear()
        logger.info("engine stopped")

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest) -> str:
        """Validate and enqueue a request.

        Args:
            request: The request.

        Returns:
            Its request id, for :meth:`stream` and :meth:`cancel`.

        Raises:
            ValueError: The request is invalid (the message names the problem).
            RuntimeError: The engine is not running.
        """
        request = dataclasses.replace(request)  # keep the caller's object untouched
        fake_ids, table_rows = self._validate(request)
        eos_ids = self._eos_ids(request.end_id)
        record = _Record(
            request_id="",
            request=request,
            eos_ids=eos_ids,
            fake_ids=fake_ids,
            table_rows=table_rows,
            sampling=self._sampling_kwargs(request),
        )
        with self._lock:
            if not self._accepting:
                raise RuntimeError("engine is not running; call start() first")
            record.request_id = f"req-{next(self._ids)}"
            self._records[record.request_id] = record
            self._pending.append(record)
            self._admit()
        return record.request_id

    def stream(self, request_id: str, min_gap: Callable[[], float] | None = None) -> Iterator[list[int]]:
        """Yield a request's new tokens as they are generated.

        Each item holds the tokens produced since the previous item. The iterator ends
        when the request finishes or is cancelled. Closing it early cancels the request.

        Args:
            request_id: Id returned by :meth:`submit`.
            min_gap: Seconds between chunks (see :func:`token_stream`); None: no pacing.

        Yields:
            Lists of new token ids (never empty).

        Raises:
            KeyError: Unknown (or already consumed) request id.
            RuntimeError: The request is already being streamed.
            EngineError: Generation failed or the engine stopped.
        """
        with self._lock:
            record = self._records.get(request_id)
            if record is None:
                raise KeyError(f"unknown request id {request_id!r}")
            if record.stream_taken:
                raise RuntimeError(f"request {request_id!r} is already being streamed")
            record.stream_taken = True
        return self._stream(record, min_gap)

    def _stream(self, record: _Record, min_gap: Callable[[], float] | None) -> Iterator[list[int]]:
        ended: list[bool] = []
        try:
            yield from token_stream(record.items, lambda: self._next_item(record), ended, min_gap)
        finally:
            if not ended:
                self.cancel(record.request_id)
            with self._lock:
                self._records.pop(record.request_id, None)

    def _next_item(self, record: _Record) -> object:
        while True:
            try:
                return record.items.get(timeout=1.0)
            except queue.Empty:
                manager = self._manager
                if manager is None or not manager.is_running():
                    raise EngineError("engine is not running") from None

    def cancel(self, request_id: str) -> None:
        """Cancel a request; its stream ends and its batch slot and table rows are freed.

        Unknown or finished requests are ignored.

        Args:
            request_id: Id returned by :meth:`submit`.
        """
        with self._lock:
            record = self._records.get(request_id)
            if record is None or record.done:
                return
            if record.admitted and self._manager is not None:
                self._manager.cancel_request(request_id)
            logger.debug("request %s cancelled after %d tokens", request_id, len(record.output))
            self._cancelled += 1
            self._finish(record, None)
            if not record.stream_taken:
                self._records.pop(request_id, None)

    # ------------------------------------------------------------------ statistics

    def step_batch_sizes(self) -> dict[int, int]:
        """Histogram of per-step batch sizes: sequences that got a token -> number of steps."""
        with self._lock:
            return dict(self._step_hist)

    @property
    def max_batch_size_seen(self) -> int:
        """Largest number of sequences that produced a token in one forward step."""
        with self._lock:
            return self._max_seen

    def reset_step_stats(self) -> None:
        """Clear the per-step batch-size statistics."""
        with self._lock:
            self._step_hist.clear()
            self._max_seen = 0

    @property
    def free_prompt_table_rows(self) -> int:
        """Rows of the shared prompt table not held by any request."""
        with self._lock:
            return len(self._free_rows)

    @property
    def num_in_flight(self) -> int:
        """Requests currently handed to the batching loop."""
        with self._lock:
            return self._in_flight

    @property
    def num_cancelled(self) -> int:
        """Requests cancelled (stream closed early, ``stop``, client gone) since the engine started."""
        with self._lock:
            return self._cancelled

    @property
    def num_pending(self) -> int:
        """Requests waiting for a batch slot or prompt-table rows."""
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ internals

    def _model_eos_ids(self) -> frozenset[int]:
        gen = getattr(self.model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None:
            return frozenset()
        ids = [eos] if isinstance(eos, int) else list(eos)
        return frozenset(int(i) for i in ids if int(i) >= 0)

    def _eos_ids(self, end_id: int | None) -> frozenset[int]:
        if end_id is None:
            return self.default_eos_ids
        return frozenset() if end_id < 0 else frozenset({int(end_id)})

    def _sampling_kwargs(self, request: GenerationRequest) -> dict[str, float | int]:
        if request.is_greedy():
            return {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        return {
            "temperature": float(request.temperature),
            "top_k": int(request.top_k) if request.top_k > 0 else self.vocab_size,
            "top_p": float(request.top_p) if request.top_p > 0 else 1.0,
        }

    def _validate(self, request: GenerationRequest) -> tuple[list[int], torch.Tensor | None]:
        """Check a request (:func:`check_request`, and the seed); return its fake-id indices and table rows."""
        if request.seed is not None and not request.is_greedy():
            raise ValueError(
                "input 'seed': per-request seeds are not supported by this engine (transformers continuous "
                "batching, the cpu and gpu-hf profiles): leave seed out, or sample greedily (temperature 0)"
            )
        fake, rows = check_request(
            request, vocab_size=self.vocab_size, hidden_size=self.hidden_size, max_input_len=self.max_input_len,
            max_output_len=self.max_output_len, prompt_table_capacity=self.prompt_table_capacity,
        )
        if rows is None:
            return fake, None
        return fake, torch.from_numpy(rows).to(device=self.device, dtype=self.dtype)

    def _admit(self) -> None:
        """Hand waiting requests to transformers while slots and rows allow. Lock held."""
        if not self._accepting or self._manager is None:
            return
        rows_blocked = False
        for record in list(self._pending):
            if self._in_flight >= self.max_batch_size:
                break
            need = len(record.fake_ids)
            if need and (rows_blocked or need > len(self._free_rows)):
                rows_blocked = True  # keep table requests FIFO; text-only ones may pass
                continue
            self._pending.remove(record)
            self._start_record(record)

    def _start_record(self, record: _Record) -> None:
        """Copy a request's table rows in and add it to transformers. Lock held."""
        ids = record.request.input_ids
        if record.fake_ids:
            rows = sorted(self._free_rows)[: len(record.fake_ids)]
            self._free_rows.difference_update(rows)
            record.rows = rows
            with torch.no_grad():
                index = torch.tensor(rows, dtype=torch.long, device=self.device)
                self.embedding.table.index_copy_(0, index, record.table_rows)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # rows visible to the loop's stream
            record.table_rows = None
            base = self.vocab_size + (next(self._tags) % self._tag_count) * self.prompt_table_capacity
            virtual = {self.vocab_size + f: base + r for f, r in zip(record.fake_ids, rows)}
            ids = [virtual.get(i, i) for i in ids]
        record.admitted = True
        self._in_flight += 1
        request_id = self._manager.add_request(
            ids,
            request_id=record.request_id,
            max_new_tokens=record.request.max_new_tokens,
            streaming=True,
            eos_token_id=sorted(record.eos_ids) or -1,
            **record.sampling,
        )
        if request_id is None:
            self._finish(record, EngineError("the generation loop is not accepting requests"), admit=False)
        else:
            logger.debug(
                "admitted %s: %d prompt tokens, %d table rows, %s",
                record.request_id,
                len(ids),
                len(record.rows),
                record.sampling,
            )

    def _finish(self, record: _Record, error: BaseException | None, *, admit: bool = True) -> None:
        """End a request: free its slot and rows, close its stream. Lock held."""
        if record.done:
            return
        record.done = True
        if record.admitted:
            self._in_flight -= 1
        elif record in self._pending:
            self._pending.remove(record)
        self._free_rows.update(record.rows)
        record.rows = []
        record.table_rows = None
        record.items.put(error if error is not None else STREAM_END)
        if admit:
            self._admit()

    def _on_outputs(self, outputs: Sequence[GenerationOutput], *, step: bool) -> None:
        """Called on the generation thread with one step's outputs (or one failure)."""
        try:
            with self._lock:
                if step:
                    self._step_hist[len(outputs)] += 1
                    self._max_seen = max(self._max_seen, len(outputs))
                for output in outputs:
                    record = self._records.get(output.request_id)
                    if record is not None and not record.done:
                        self._on_output(record, output)
        except Exception:  # never let a bookkeeping bug kill the generation loop
            logger.exception("engine failed to process generation outputs")

    def _on_output(self, record: _Record, output: GenerationOutput) -> None:
        """Apply one cumulative output to a request. Lock held."""
        tokens = output.generated_tokens
        new = [int(t) for t in tokens[record.seen :]]
        record.seen = len(tokens)
        if output.status == RequestStatus.FAILED or output.error is not None:
            self._finish(record, EngineError(f"request {record.request_id} failed: {output.error}"))
            return
        finished = output.is_finished()
        if finished and new and new[-1] in record.eos_ids:
            new.pop()  # TensorRT-LLM does not return the end id
        emit: list[int] = []
        stopped = False
        for token in new:
            emit.append(token)
            record.output.append(token)
            if any(
                len(record.output) >= len(word) and record.output[-len(word) :] == word
                for word in record.request.stop_words
            ):
                stopped = True
                break
        if emit:
            record.items.put(emit)
        if stopped:
            if not finished and self._manager is not None:
                self._manager.cancel_request(record.request_id)
            self._finish(record, None)
        elif finished:
            self._finish(record, None)
