"""Engine batch statistics for vLLM: a stat logger that counts sequences per engine step.

vLLM 0.26.0's ``AsyncLLM`` hands its statistics to *stat loggers*;
``AsyncLLM.from_engine_args(args, stat_loggers=[factory])`` takes factories. A factory
that is not an ``AggregateStatLoggerBase`` subclass is a *per-engine* factory, called
positionally as ``factory(vllm_config, engine_index)`` once per engine core
(``vllm/v1/metrics/loggers.py``: ``PerEngineStatLoggerFactory``, lines 39-41;
``StatLoggerManager.__init__``, lines 1324-1373). :class:`VllmBatchStats` is such a
factory: calling it returns a logger that feeds this one thread-safe accumulator.

When is ``record`` called? ``AsyncLLM``'s output handler calls it once for every
``EngineCoreOutputs`` it receives (``vllm/v1/engine/async_llm.py``, lines 656-702).
With stats on, the scheduler attaches a fresh ``SchedulerStats`` to the outputs of
every engine step, even a step with no request outputs
(``vllm/v1/core/sched/scheduler.py``, lines 1945-1958); outputs sent outside a step
(finish notices, DP load-balancing messages) carry no ``SchedulerStats`` or come
with no outputs. So here **one record with** ``scheduler_stats`` **is one engine
step** (one engine core, one front end, as this project runs vLLM), and records
without it are ignored.

How many sequences were in the step? Two sources, best first:

1. ``scheduler_stats.iteration_details`` (``SchedulerIterationDetails``), set only when
   the engine runs with ``enable_logging_iteration_details=True``
   (``vllm/v1/engine/core.py``, lines 502-567): ``num_ctx_requests +
   num_generation_requests`` is exactly the number of requests the scheduler put in
   the step's batch, prefill chunks that produce no token included. Dummy
   (data-parallel padding) iterations are not steps here.
2. Otherwise ``iteration_stats`` (``IterationStats``, built per ``EngineCoreOutputs``):
   ``IterationStats.update_from_output`` runs once per request output of the step and
   appends one entry to ``time_to_first_tokens_iter`` (first token) or to
   ``inter_token_latencies_iter`` (later tokens) (``vllm/v1/metrics/stats.py``, lines
   377-426), so the sum of their lengths is the number of requests that got tokens
   (or ended) in that step. It misses partial prefill chunks (they emit no output,
   ``scheduler.py`` lines 1798-1853) and requests the front end already dropped
   (``output_processor.py`` lines 616-621). Token counts such as
   ``num_generation_tokens`` are not used: with speculative decoding one request
   gets several tokens a step.

A step with no sequence (async scheduling queues empty batches; requests waiting
for KV transfers) is counted in :attr:`VllmBatchStats.idle_steps`, not in the
histogram, so the mean batch ``sum(k * v) / sum(v)`` is over steps that ran a batch.

Running and waiting counts are the latest ``SchedulerStats.num_running_reqs`` and
``num_waiting_reqs + num_skipped_waiting_reqs`` (what vLLM's own Prometheus gauges
``vllm:num_requests_running`` / ``vllm:num_requests_waiting`` report), taken after
the step's outputs were applied.

vLLM calls the loggers from the event loop thread of ``AsyncLLM``; the accessors are
read from other threads (Triton's metrics), hence the lock. The module imports
without vLLM; when vLLM is importable the loggers it makes subclass vLLM's
``StatLoggerBase``.
"""

from __future__ import annotations

import logging
import threading
import types
from collections import Counter
from typing import Any

LOGGER = logging.getLogger(__name__)


class VllmBatchStats:
    """Thread-safe per-step batch statistics of vLLM engine cores; a per-engine stat-logger factory.

    Pass the instance itself in ``AsyncLLM.from_engine_args(..., stat_loggers=[stats])``;
    vLLM calls ``stats(vllm_config, engine_index)`` for each engine core and records
    into the logger that call returns. All engine cores feed the same counts.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: Counter[int] = Counter()
        self._max_seen = 0
        self._idle_steps = 0
        self._detailed_steps = 0
        self._running = 0
        self._waiting = 0

    # ------------------------------------------------------------------ vLLM side

    def __call__(self, vllm_config: Any = None, engine_index: int = 0) -> Any:
        """The per-engine factory vLLM calls: ``PerEngineStatLoggerFactory(vllm_config, engine_index)``.

        Args:
            vllm_config: vLLM's ``VllmConfig`` (not used).
            engine_index: Index of the engine core the logger serves.

        Returns:
            A stat logger recording into this object; an instance of vLLM's
            ``StatLoggerBase`` when vLLM is importable.
        """
        return _logger_class()(vllm_config, engine_index, stats=self)

    def observe(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        """Account one ``record`` call (see the module docstring for the rules).

        Args:
            scheduler_stats: vLLM ``SchedulerStats`` or ``None``.
            iteration_stats: vLLM ``IterationStats`` or ``None``.
        """
        if scheduler_stats is None:
            return  # not an engine step (finish notices and the like)
        details = getattr(scheduler_stats, "iteration_details", None)
        if details is not None:
            sequences = 0 if details.is_dummy else details.num_ctx_requests + details.num_generation_requests
        elif iteration_stats is not None:
            sequences = len(iteration_stats.time_to_first_tokens_iter) + len(iteration_stats.inter_token_latencies_iter)
        else:
            sequences = 0
        running = int(scheduler_stats.num_running_reqs)
        waiting = int(scheduler_stats.num_waiting_reqs) + int(getattr(scheduler_stats, "num_skipped_waiting_reqs", 0))
        with self._lock:
            self._running = running
            self._waiting = waiting
            if details is not None:
                self._detailed_steps += 1
            if sequences <= 0:
                self._idle_steps += 1
                return
            self._steps[sequences] += 1
            self._max_seen = max(self._max_seen, sequences)

    # ------------------------------------------------------------------ readers

    def step_batch_sizes(self) -> dict[int, int]:
        """Sequences in a step -> number of engine steps with that many (a copy)."""
        with self._lock:
            return dict(self._steps)

    @property
    def max_batch_size_seen(self) -> int:
        """The most sequences seen in one step."""
        with self._lock:
            return self._max_seen

    @property
    def idle_steps(self) -> int:
        """Engine steps that ran no sequence (not in :meth:`step_batch_sizes`)."""
        with self._lock:
            return self._idle_steps

    @property
    def detailed_steps(self) -> int:
        """Steps counted from ``iteration_details`` (the exact source); 0 means the fallback is in use."""
        with self._lock:
            return self._detailed_steps

    @property
    def num_running(self) -> int:
        """Requests vLLM's scheduler had running after the latest step."""
        with self._lock:
            return self._running

    @property
    def num_waiting(self) -> int:
        """Requests waiting in vLLM's scheduler after the latest step (no batch slot yet, or deferred)."""
        with self._lock:
            return self._waiting


class _EngineStatLogger:
    """vLLM's ``StatLoggerBase`` interface (0.26.0) for one engine core, recording into :class:`VllmBatchStats`.

    Args:
        vllm_config: vLLM's ``VllmConfig`` (not used).
        engine_index: Index of the engine core.
        stats: The accumulator.
    """

    def __init__(self, vllm_config: Any, engine_index: int = 0, *, stats: VllmBatchStats) -> None:
        self.vllm_config = vllm_config
        self.engine_index = engine_index
        self.stats = stats

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        """Called by vLLM for every ``EngineCoreOutputs`` the front end receives."""
        self.stats.observe(scheduler_stats, iteration_stats)

    def log_engine_initialized(self) -> None:
        """Called once when ``AsyncLLM`` has started its engine cores."""
        LOGGER.info("vLLM engine %d: batch statistics recording", self.engine_index)

    def log(self) -> None:
        """Periodic logging hook (``AsyncLLM.do_log_stats``); nothing to log."""

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        """Sleep-mode hook; not tracked."""


def _logger_class() -> type:
    """:class:`_EngineStatLogger`, made a subclass of vLLM's ``StatLoggerBase`` when vLLM is importable."""
    try:
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError:
        return _EngineStatLogger
    return types.new_class("VllmEngineStatLogger", (_EngineStatLogger, StatLoggerBase))
