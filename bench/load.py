"""The closed-loop load: workers each keep one gRPC stream open and send their next request when one ends."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.stats import RequestTiming
from bench.triton_stats import ServerTarget, grpc_client
from bench.workload import BenchSettings, PlannedRequest, Workload
from clients.llm import Sampling, grpc_chunk, grpc_inputs, request_values

LOGGER = logging.getLogger(__name__)
PROGRESS_PERIOD_S = 2.0


@dataclass
class RequestRecord:
    """Everything recorded for one request (times in seconds from the configuration's start, ``t0``).

    Attributes:
        index: Workload index (negative: warm-up).
        model: Ensemble it went to.
        request_id: The id sent with it.
        prompt_tokens: Client-side token count of the user text.
        image_bytes, audio_bytes: Size of the media sent (0: none).
        max_tokens: ``max_tokens`` sent.
        send_s, end_s: Send time and last response time.
        token_times_s: Arrival time of each output token.
        output_tokens: Output token ids received (counted by the client).
        server_input_tokens: ``num_input_tokens`` the server returned (chat template and
            media rows included).
        server_output_tokens: ``num_output_tokens`` of the last response.
        error: Why it failed, or None.
    """

    index: int
    model: str
    request_id: str
    prompt_tokens: int
    image_bytes: int
    audio_bytes: int
    max_tokens: int
    send_s: float
    end_s: float
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    server_input_tokens: int | None = None
    server_output_tokens: int | None = None
    error: str | None = None

    def timing(self) -> RequestTiming:
        """The timings :mod:`bench.stats` works on."""
        return RequestTiming(self.send_s, self.end_s, list(self.token_times_s), self.output_tokens, self.error)


class _StreamSession:
    """One gRPC stream reused for consecutive requests (one per worker).

    After an error or a timeout the stream is closed (cancelling whatever was in
    flight on it) and the next request opens a new one.
    """

    def __init__(self, url: str, timeout_s: float, fixed_length_input: str | None = None) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.fixed_length_input = fixed_length_input
        self._client: Any = None
        self._responses: queue.SimpleQueue[tuple[float, Any, Any]] = queue.SimpleQueue()

    def _callback(self, result: Any, error: Any) -> None:
        self._responses.put((time.perf_counter(), result, error))

    def _open(self) -> None:
        self._responses = queue.SimpleQueue()
        self._client = grpc_client(self.url)
        self._client.start_stream(callback=self._callback)

    def close(self) -> None:
        """Close the stream and its channel."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.stop_stream(cancel_requests=True)
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def send(self, planned: PlannedRequest, max_tokens: int, request_id: str, t0: float) -> RequestRecord:
        """Send one request and follow its stream to the final response.

        Args:
            planned: The request.
            max_tokens: Output tokens asked for.
            request_id: Id sent with it.
            t0: ``time.perf_counter()`` value the record's times are relative to.
        """
        sampling = Sampling(max_tokens=max_tokens, ignore_eos=self.fixed_length_input == "ignore_eos")
        values = request_values(planned.prompt, planned.image, planned.audio, sampling, stream=True)
        if self.fixed_length_input == "min_tokens":
            values["min_tokens"] = np.array([[max_tokens]], dtype=np.int32)
        inputs = grpc_inputs(values)
        record = RequestRecord(
            index=planned.index,
            model=planned.model,
            request_id=request_id,
            prompt_tokens=planned.prompt_tokens,
            image_bytes=len(planned.image or b""),
            audio_bytes=len(planned.audio or b""),
            max_tokens=max_tokens,
            send_s=0.0,
            end_s=0.0,
        )
        try:
            if self._client is None:
                self._open()
            record.send_s = time.perf_counter() - t0
            self._client.async_stream_infer(
                planned.model, inputs, request_id=request_id, enable_empty_final_response=True
            )
            while True:
                try:
                    arrived, result, error = self._responses.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise TimeoutError(f"no response within {self.timeout_s:.0f} s") from None
                if error is not None:
                    raise RuntimeError(str(error))
                response = result.get_response()
                if response.id and response.id != request_id:
                    continue  # a late response of an earlier request on this stream
                chunk = grpc_chunk(result)
                if chunk is not None:
                    record.token_times_s.extend([arrived - t0] * len(chunk.token_ids))
                    record.output_tokens += len(chunk.token_ids)
                    record.server_input_tokens = chunk.num_input_tokens
                    record.server_output_tokens = chunk.num_output_tokens
                if response.parameters["triton_final_response"].bool_param:
                    record.end_s = arrived - t0
                    return record
        except Exception as err:  # noqa: BLE001 - every failure is recorded, the run goes on
            record.error = f"{type(err).__name__}: {err}"
            record.end_s = time.perf_counter() - t0
            self.close()
            return record


Progress = Callable[[str], None]


def run_requests(
    target: ServerTarget,
    workload: Workload,
    indices: Iterator[int],
    concurrency: int,
    settings: BenchSettings,
    t0: float,
    deadline: float | None = None,
    progress: Progress | None = None,
    label: str = "",
    fixed_length_input: str | None = None,
) -> list[RequestRecord]:
    """Closed-loop load: ``concurrency`` workers take the next index until none is left or the deadline passes.

    Args:
        target: Server to send to.
        workload: Request factory.
        indices: Workload indices to send, in order (may be endless when ``deadline`` is set).
        concurrency: Workers (requests in flight at once).
        settings: Output length and timeout.
        t0: Time origin of the records.
        deadline: ``time.perf_counter()`` after which no new request starts.
        progress: Called with a progress line when a request completes at least
            ``PROGRESS_PERIOD_S`` seconds after the previous line.
        label: Prefix of the progress lines.
        fixed_length_input: Chat-ensemble input to send so outputs have ``max_tokens`` tokens.

    Returns:
        One record per request sent, in completion order.
    """
    lock = threading.Lock()
    records: list[RequestRecord] = []
    run_tag = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    last_line = [started]

    def next_index() -> int | None:
        with lock:
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            return next(indices, None)

    def worker() -> None:
        session = _StreamSession(target.grpc_url, settings.timeout_s, fixed_length_input)
        try:
            while (index := next_index()) is not None:
                planned = workload.request(index)
                record = session.send(planned, settings.output_tokens, f"bench-{run_tag}-{index}", t0)
                with lock:
                    records.append(record)
                    done = len(records)
                    errors = sum(1 for r in records if r.error)
                    tokens = sum(r.output_tokens for r in records if not r.error)
                if record.error:
                    LOGGER.error("request %d failed: %s", index, record.error)
                now = time.perf_counter()
                if progress is not None and now - last_line[0] >= PROGRESS_PERIOD_S:
                    last_line[0] = now
                    elapsed = now - started
                    progress(
                        f"[{label}c={concurrency}] {done} done, {errors} errors, "
                        f"{done / elapsed:.2f} req/s, {tokens / elapsed:.1f} tok/s, {elapsed:.1f} s"
                    )
        finally:
            session.close()

    threads = [threading.Thread(target=worker, name=f"bench-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return records
