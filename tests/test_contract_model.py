"""The python ``tensorrt_llm`` model's logic (mmtriton.llm.contract_model) without a server.

The server-level behaviour (streams, stop requests, metrics on ``/metrics``) is covered by
the chat, cancellation and robustness tests against the real server; here each piece is
checked against values worked out by hand from the TensorRT-LLM contract.
"""

from __future__ import annotations

import numpy as np
import pytest

from mmtriton.llm.contract_model import EngineCounters, RequestIds, StreamPacing, generation_request, make_engine


def test_make_engine_refuses_an_engine_it_does_not_know() -> None:
    with pytest.raises(ValueError, match=r"parameter 'engine' is 'tensorrt'; expected one of transformers, vllm"):
        make_engine({"engine": "tensorrt"}, 8)
    with pytest.raises(KeyError):
        make_engine({}, 8)  # required: the renderer always writes it, there is no second default


def test_generation_request_reads_the_contract_tensors() -> None:
    table = np.arange(2 * 3 * 4, dtype=np.float16).reshape(1, 6, 4)
    # stop_words_list [1, 2, N]: flattened ids, then end offsets padded with -1 (TensorRT-LLM's layout).
    stop = np.array([[[7, 8, 9, 0], [2, 3, -1, -1]]], dtype=np.int32)
    tensors = {
        "input_ids": np.array([[5, 6, 512, 513, 0, 0]], dtype=np.int32),
        "input_lengths": np.array([[4]], dtype=np.int32),
        "request_output_len": np.array([[16]], dtype=np.int32),
        "end_id": np.array([[2]], dtype=np.int32),
        "temperature": np.array([[0.7]], dtype=np.float32),
        "runtime_top_p": np.array([[0.9]], dtype=np.float32),
        "seed": np.array([[11]], dtype=np.uint64),
        "stop_words_list": stop,
        "prompt_embedding_table": table,
        "prompt_vocab_size": np.array([[6]], dtype=np.int32),
    }
    request = generation_request(tensors.get)
    assert request.input_ids == [5, 6, 512, 513]  # input_lengths cuts the padding
    assert (request.max_new_tokens, request.end_id, request.pad_id, request.seed) == (16, 2, None, 11)
    assert request.temperature == pytest.approx(0.7) and request.top_p == pytest.approx(0.9) and request.top_k == 0
    assert request.stop_words == [[7, 8], [9]]
    assert request.prompt_table.shape == (6, 4) and request.prompt_vocab_size == 6
    assert not np.shares_memory(request.prompt_table, table)  # a copy: the input buffer may go
    # Absent optional inputs take the contract's defaults (greedy: neither top-k nor top-p).
    minimal = generation_request({k: tensors[k] for k in ("input_ids", "input_lengths", "request_output_len")}.get)
    assert minimal.is_greedy() and minimal.prompt_table is None and minimal.stop_words == []


def test_stream_pacing_shares_the_rate() -> None:
    pacing = StreamPacing(1000)
    for _ in range(40):
        pacing.enter()
    assert pacing.enabled and pacing.gap() == pytest.approx(0.04)  # 40 streams share 1000 responses/s
    for _ in range(30):
        pacing.leave()
    assert pacing.gap() == pytest.approx(0.01)
    assert not StreamPacing(0).enabled


def test_request_ids_keep_the_newest_request_of_a_reused_id() -> None:
    ids = RequestIds()
    ids.add("client-1", "req-1")
    ids.add("", "req-2")  # no Triton id: cannot be stopped by id
    assert ids.engine_id("client-1") == "req-1" and len(ids) == 1
    ids.add("client-1", "req-3")  # the client reused its id for a new request
    ids.forget("client-1", "req-1")  # the old one ends: the new one stays stoppable
    assert ids.engine_id("client-1") == "req-3"
    ids.forget("client-1", "req-3")
    assert ids.engine_id("client-1") is None and len(ids) == 0


class _Totals:
    """An engine's cumulative figures, as the engines report them."""

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.num_cancelled = 0

    def step_batch_sizes(self) -> dict[int, int]:
        return dict(self.hist)


def test_engine_counters_report_what_changed() -> None:
    engine, counters = _Totals(), EngineCounters()
    assert counters.increments(engine) == (0, 0, 0)
    engine.hist = {1: 3, 4: 2}  # 3 steps of one sequence, 2 of four
    engine.num_cancelled = 1
    assert counters.increments(engine) == (5, 3 + 8, 1)
    engine.hist = {1: 3, 4: 2, 8: 1}
    assert counters.increments(engine) == (1, 8, 0)
    assert counters.increments(engine) == (0, 0, 0)
