"""mmtriton.llm.vllm_stats on CPU, with stand-ins for vLLM 0.26.0's statistics objects.

The stand-ins carry exactly the field names of vLLM 0.26.0:

- ``vllm/v1/metrics/stats.py`` ``SchedulerIterationDetails`` (dataclass):
  iteration_index, num_ctx_requests, num_ctx_tokens, num_generation_requests,
  num_generation_tokens, elapsed_ms, num_encoder_inputs=0,
  num_encoder_output_tokens=0, is_dummy=False.
- ``vllm/v1/metrics/stats.py`` ``SchedulerStats`` (dataclass): num_running_reqs,
  num_waiting_reqs, num_skipped_waiting_reqs, step_counter, current_wave,
  kv_cache_usage, iteration_details, prefix_cache_stats,
  connector_prefix_cache_stats, kv_cache_eviction_events, spec_decoding_stats,
  kv_connector_stats, waiting_lora_adapters, running_lora_adapters,
  cudagraph_stats, perf_stats.
- ``vllm/v1/metrics/stats.py`` ``IterationStats`` (plain class, set in ``__init__``):
  iteration_timestamp, num_generation_tokens, prompt_token_stats,
  num_preempted_reqs, finished_requests, max_num_generation_tokens_iter,
  n_params_iter, time_to_first_tokens_iter, inter_token_latencies_iter,
  num_corrupted_reqs. ``update_from_output`` appends to
  ``time_to_first_tokens_iter`` for a prefilling request and to
  ``inter_token_latencies_iter`` otherwise, once per request output.
- ``vllm/v1/metrics/loggers.py`` ``StatLoggerBase`` (ABC): abstract
  ``__init__(vllm_config, engine_index=0)``, abstract
  ``record(scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0)``,
  abstract ``log_engine_initialized()``, ``log()``, ``record_sleep_state(is_awake, level)``.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import types
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from mmtriton.llm.vllm_stats import VllmBatchStats


@dataclass
class SchedulerIterationDetails:
    iteration_index: int
    num_ctx_requests: int
    num_ctx_tokens: int
    num_generation_requests: int
    num_generation_tokens: int
    elapsed_ms: float
    num_encoder_inputs: int = 0
    num_encoder_output_tokens: int = 0
    is_dummy: bool = False


@dataclass
class SchedulerStats:
    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    num_skipped_waiting_reqs: int = 0
    step_counter: int = 0
    current_wave: int = 0
    kv_cache_usage: float = 0.0
    iteration_details: SchedulerIterationDetails | None = None
    prefix_cache_stats: Any = None
    connector_prefix_cache_stats: Any = None
    kv_cache_eviction_events: list = field(default_factory=list)
    spec_decoding_stats: Any = None
    kv_connector_stats: dict | None = None
    waiting_lora_adapters: dict = field(default_factory=dict)
    running_lora_adapters: dict = field(default_factory=dict)
    cudagraph_stats: Any = None
    perf_stats: Any = None


class IterationStats:
    def __init__(self) -> None:
        self.iteration_timestamp = time.time()
        self.num_generation_tokens = 0
        self.prompt_token_stats = None
        self.num_preempted_reqs = 0
        self.finished_requests: list = []
        self.max_num_generation_tokens_iter: list[int] = []
        self.n_params_iter: list[int] = []
        self.time_to_first_tokens_iter: list[float] = []
        self.inter_token_latencies_iter: list[float] = []
        self.num_corrupted_reqs = 0

    def update_from_output(self, new_tokens: int, is_prefilling: bool) -> None:
        """What upstream's update_from_output does to the fields read here."""
        self.num_generation_tokens += new_tokens
        if is_prefilling:
            self.time_to_first_tokens_iter.append(0.1)
        else:
            self.inter_token_latencies_iter.append(0.01)


@dataclass
class Step:
    """One simulated engine step: who was scheduled, and in which phase."""

    prefill_done: list[str]  # prefills that finished this step (emit their first token)
    prefill_chunks: list[str]  # partial prefill chunks (no output)
    decoding: list[str]  # requests that got a token
    tokens_per_decode: int = 1  # > 1 with speculative decoding
    running_after: int = 0
    waiting_after: int = 0
    skipped_after: int = 0


def outputs_of(step: Step, *, details: bool) -> tuple[SchedulerStats, IterationStats | None]:
    """What AsyncLLM hands to ``record`` for one step (async_llm.py output_handler)."""
    outputs = len(step.prefill_done) + len(step.decoding)
    iteration = None
    if outputs:  # IterationStats() if (log_stats and num_outputs) else None
        iteration = IterationStats()
        for _ in step.prefill_done:
            iteration.update_from_output(1, is_prefilling=True)
        for _ in step.decoding:
            iteration.update_from_output(step.tokens_per_decode, is_prefilling=False)
    sched = SchedulerStats(
        num_running_reqs=step.running_after,
        num_waiting_reqs=step.waiting_after,
        num_skipped_waiting_reqs=step.skipped_after,
    )
    scheduled = len(step.prefill_done) + len(step.prefill_chunks) + len(step.decoding)
    if details and scheduled:  # capture_iteration_details yields None for 0-token steps
        sched.iteration_details = SchedulerIterationDetails(
            iteration_index=0,
            num_ctx_requests=len(step.prefill_done) + len(step.prefill_chunks),
            num_ctx_tokens=100 * (len(step.prefill_done) + len(step.prefill_chunks)),
            num_generation_requests=len(step.decoding),
            num_generation_tokens=len(step.decoding) * step.tokens_per_decode,
            elapsed_ms=1.0,
        )
    return sched, iteration


def random_steps(seed: int, n: int = 300) -> list[Step]:
    rng = random.Random(seed)
    steps = []
    for i in range(n):
        names = iter(f"r{i}-{j}" for j in range(100))
        steps.append(
            Step(
                prefill_done=[next(names) for _ in range(rng.choice([0, 0, 0, 1, 2]))],
                prefill_chunks=[next(names) for _ in range(rng.choice([0, 0, 0, 0, 1]))],
                decoding=[next(names) for _ in range(rng.choice([0, 1, 3, 7, 8, 16, 31]))],
                tokens_per_decode=rng.choice([1, 1, 3]),
                running_after=rng.randrange(64),
                waiting_after=rng.randrange(10),
                skipped_after=rng.randrange(3),
            )
        )
    return steps


def expected(steps: list[Step], *, count_chunks: bool) -> tuple[dict[int, int], int]:
    """Histogram of non-empty steps and the number of empty ones, straight from the scenario."""
    sizes = [len(s.prefill_done) + len(s.decoding) + (len(s.prefill_chunks) if count_chunks else 0) for s in steps]
    return dict(Counter(k for k in sizes if k)), sum(1 for k in sizes if not k)


@pytest.mark.parametrize("details", [False, True], ids=["iteration_stats", "iteration_details"])
def test_histogram_and_counts_match_the_scenario(details: bool) -> None:
    steps = random_steps(seed=7)
    stats = VllmBatchStats()
    logger = stats(object(), 0)
    for step in steps:
        sched, iteration = outputs_of(step, details=details)
        logger.record(sched, iteration, mm_cache_stats=None, engine_idx=0)
        # Outputs outside a step (finish notices) carry no SchedulerStats: ignored.
        notice = IterationStats()
        notice.update_from_output(0, is_prefilling=False)
        logger.record(None, notice, mm_cache_stats=None, engine_idx=0)

    want, idle = expected(steps, count_chunks=details)
    assert stats.step_batch_sizes() == want
    assert stats.idle_steps == idle
    assert stats.max_batch_size_seen == max(want)
    assert stats.detailed_steps == (sum(want.values()) if details else 0)
    assert stats.num_running == steps[-1].running_after
    assert stats.num_waiting == steps[-1].waiting_after + steps[-1].skipped_after
    mean = sum(k * v for k, v in stats.step_batch_sizes().items()) / sum(stats.step_batch_sizes().values())
    sizes = [len(s.prefill_done) + len(s.decoding) + (len(s.prefill_chunks) if details else 0) for s in steps]
    assert mean == pytest.approx(sum(sizes) / sum(1 for k in sizes if k))


def test_details_win_over_iteration_stats_and_dummy_steps_are_idle() -> None:
    stats = VllmBatchStats()
    logger = stats(None, 0)
    step = Step(prefill_done=["a"], prefill_chunks=["b", "c"], decoding=["d", "e"])
    sched, iteration = outputs_of(step, details=True)
    logger.record(sched, iteration)
    assert stats.step_batch_sizes() == {5: 1}  # 3 from iteration_stats alone
    dummy = SchedulerStats(iteration_details=SchedulerIterationDetails(0, 0, 0, 0, 0, 0.0, is_dummy=True))
    logger.record(dummy, None)
    assert stats.step_batch_sizes() == {5: 1}
    assert stats.idle_steps == 1
    assert stats.step_batch_sizes() is not stats.step_batch_sizes()  # copies


def test_loggers_of_several_engines_share_the_counts() -> None:
    stats = VllmBatchStats()
    loggers = [stats(None, i) for i in range(2)]
    for i, size in enumerate([4, 4, 2, 9]):
        iteration = IterationStats()
        for _ in range(size):
            iteration.update_from_output(1, is_prefilling=False)
        loggers[i % 2].record(SchedulerStats(num_running_reqs=size), iteration, engine_idx=i % 2)
    assert stats.step_batch_sizes() == {4: 2, 2: 1, 9: 1}
    assert stats.max_batch_size_seen == 9
    assert [lg.engine_index for lg in loggers] == [0, 1]


def test_concurrent_records_and_reads_lose_nothing() -> None:
    stats = VllmBatchStats()
    logger = stats(None, 0)
    per_thread = 500
    sizes = [1, 2, 3, 5]

    def work(size: int) -> None:
        for _ in range(per_thread):
            iteration = IterationStats()
            for _ in range(size):
                iteration.update_from_output(1, is_prefilling=False)
            logger.record(SchedulerStats(num_running_reqs=size), iteration)
            stats.step_batch_sizes()

    threads = [threading.Thread(target=work, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stats.step_batch_sizes() == {s: per_thread for s in sizes}


def _fake_vllm_loggers() -> tuple[dict[str, types.ModuleType], type]:
    class StatLoggerBase(ABC):
        @abstractmethod
        def __init__(self, vllm_config: Any, engine_index: int = 0): ...

        @abstractmethod
        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0): ...

        @abstractmethod
        def log_engine_initialized(self): ...

        def log(self):  # noqa: D102
            pass

        def record_sleep_state(self, is_awake: int, level: int):  # noqa: D102
            pass

    names = ["vllm", "vllm.v1", "vllm.v1.metrics", "vllm.v1.metrics.loggers"]
    modules = {name: types.ModuleType(name) for name in names}
    modules["vllm.v1.metrics.loggers"].StatLoggerBase = StatLoggerBase
    return modules, StatLoggerBase


def test_the_logger_subclasses_vllms_base_when_vllm_is_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    modules, base = _fake_vllm_loggers()
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    stats = VllmBatchStats()
    logger = stats(object(), 3)  # StatLoggerManager calls factory(vllm_config, engine_index)
    assert isinstance(logger, base)
    assert logger.engine_index == 3
    logger.log_engine_initialized()
    logger.log()
    logger.record_sleep_state(1, 0)
    iteration = IterationStats()
    iteration.update_from_output(1, is_prefilling=True)
    logger.record(SchedulerStats(num_running_reqs=1), iteration, mm_cache_stats=None, engine_idx=3)
    assert stats.step_batch_sizes() == {1: 1}


def test_the_logger_is_duck_typed_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    stats = VllmBatchStats()
    logger = stats(None, 0)
    for name in ("record", "log_engine_initialized", "log", "record_sleep_state"):
        assert callable(getattr(logger, name))
    logger.record(SchedulerStats(num_running_reqs=2, num_waiting_reqs=5), None)
    assert stats.idle_steps == 1 and stats.num_running == 2 and stats.num_waiting == 5
    assert stats.step_batch_sizes() == {} and stats.max_batch_size_seen == 0
