"""The python ``tensorrt_llm`` model (cpu, gpu-hf, gpu-vllm): the TensorRT-LLM tensor contract over an engine.

The engine is the one the rendered ``engine`` parameter names (transformers' continuous
batching, or vLLM); the decisions (engine, request mapping, pacing, stop ids, metric
increments) live in :mod:`mmtriton.llm.contract_model`, this file only talks to Triton.

Decoupled: every request gets its responses from a worker thread that follows the
engine's token stream. ``streaming=true`` sends new tokens as they come, then an
empty final response; otherwise one response carries every generated token. With
parameter ``stream_chunk_rate`` (responses per second over all streaming requests)
a request's tokens that arrive within its share of that rate go out as one chunk;
the first token is never held back.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from mmtriton.backend.glue import error_response, model_parameters, optional_input, scalar_input
from mmtriton.backend.stub_watchdog import exit_with_parent
from mmtriton.llm.contract_model import EngineCounters, RequestIds, StreamPacing, generation_request, make_engine
from mmtriton.llm.generation import EngineError


class TritonPythonModel:
    """Feeds requests to one shared continuous-batching engine and streams its tokens back."""

    def initialize(self, args: dict) -> None:
        exit_with_parent()
        config = json.loads(args["model_config"])
        params = model_parameters(args)
        self.max_batch_size = int(config["max_batch_size"])
        self.engine = make_engine(params, self.max_batch_size)
        self.engine.start()
        self.pacing = StreamPacing(float(params["stream_chunk_rate"]))
        self.workers = ThreadPoolExecutor(max_workers=4 * self.max_batch_size + 4, thread_name_prefix="stream")
        self.running = RequestIds()
        self._metrics()

    def _metric(self, name: str, description: str, kind):
        # A family must outlive its metrics, so the families are kept on the model too.
        family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
        self.families.append(family)
        return family.Metric(labels={"model": "tensorrt_llm"})

    def _metrics(self) -> None:
        # The engine's own per-step batch sizes, on Triton's /metrics endpoint.
        gauge, counter = pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER
        self.families = []
        self.metric_max = self._metric(
            "mmtriton_engine_step_batch_size_max", "Largest number of sequences decoded together in one engine step", gauge
        )
        self.metric_steps = self._metric("mmtriton_engine_steps_total", "Engine forward steps that produced tokens", counter)
        self.metric_tokens = self._metric(
            "mmtriton_engine_step_sequences_total",
            "Sum over engine steps of the sequences in each step (divided by steps: the mean batch size)",
            counter,
        )
        self.metric_active = self._metric(
            "mmtriton_engine_requests_in_flight", "Requests admitted to the engine's running batch", gauge
        )
        self.metric_queued = self._metric(
            "mmtriton_engine_requests_queued", "Requests accepted by the engine and waiting for a batch slot", gauge
        )
        self.metric_cancelled = self._metric(
            "mmtriton_engine_requests_cancelled_total",
            "Requests ended early because their client went away or sent stop",
            counter,
        )
        self.counters = EngineCounters()
        self.stop_metrics = threading.Event()
        threading.Thread(target=self._report_metrics, daemon=True).start()

    def _report_metrics(self) -> None:
        while not self.stop_metrics.wait(0.2):
            steps, sequences, cancelled = self.counters.increments(self.engine)
            self.metric_steps.increment(steps)
            self.metric_tokens.increment(sequences)
            self.metric_cancelled.increment(cancelled)
            self.metric_max.set(self.engine.max_batch_size_seen)
            self.metric_active.set(self.engine.num_in_flight)
            self.metric_queued.set(self.engine.num_pending)

    @staticmethod
    def _response(tokens: list, num_input: int, num_output: int) -> pb_utils.InferenceResponse:
        ids = np.asarray(tokens, dtype=np.int32).reshape(1, 1, -1)
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("output_ids", ids),
                pb_utils.Tensor("sequence_length", np.array([[ids.shape[-1]]], dtype=np.int32)),
                pb_utils.Tensor("num_input_tokens", np.array([[num_input]], dtype=np.int32)),
                pb_utils.Tensor("num_output_tokens", np.array([[num_output]], dtype=np.int32)),
            ]
        )

    def _serve(self, request, engine_id: str, streaming: bool, num_input: int) -> None:
        sender = request.get_response_sender()
        triton_id = request.request_id()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        generated: list = []
        paced = streaming and self.pacing.enabled
        if paced:
            self.pacing.enter()
        try:
            stream = self.engine.stream(engine_id, self.pacing.gap if paced else None)
            for new in stream:
                generated.extend(new)
                if sender.is_cancelled():
                    # Closing the stream cancels the engine request and frees its slot. The step
                    # still ends with a plain final flag: an error here, while postprocessing
                    # steps of the same request may be in flight, would strand the ensemble
                    # request in Triton 2.51 (see mmtriton/backend/cancellation.py).
                    stream.close()
                    break
                if streaming:
                    sender.send(self._response(new, num_input, len(generated)))
            if streaming or sender.is_cancelled():
                sender.send(flags=final)
            else:
                sender.send(self._response(generated, num_input, len(generated)), flags=final)
        except EngineError as err:
            sender.send(error_response(f"generation failed: {err}", "INTERNAL"), flags=final)
        finally:
            if paced:
                self.pacing.leave()
            self.running.forget(triton_id, engine_id)

    def _stop(self, request) -> None:
        # TensorRT-LLM semantics: a request with stop=true cancels the running request of the same id.
        engine_id = self.running.engine_id(request.request_id())
        if engine_id is not None:
            self.engine.cancel(engine_id)
        request.get_response_sender().send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def execute(self, requests: list) -> None:
        for request in requests:
            if scalar_input(request, "stop", False):
                self._stop(request)
                continue
            try:
                generation = generation_request(lambda name: optional_input(request, name))
                engine_id = self.engine.submit(generation)
            except ValueError as err:
                sender = request.get_response_sender()
                sender.send(error_response(str(err)), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.running.add(request.request_id(), engine_id)
            streaming = bool(scalar_input(request, "streaming", False))
            self.workers.submit(self._serve, request, engine_id, streaming, len(generation.input_ids))
        return None

    def finalize(self) -> None:
        self.stop_metrics.set()
        self.engine.stop(timeout=10)
        self.workers.shutdown(wait=False, cancel_futures=True)
