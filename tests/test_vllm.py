"""The vLLM engine behind the tensorrt_llm contract (mmtriton/llm/vllm_engine.py, the gpu-vllm profile).

Without a GPU: the request mapping (sampling, ends, stop words) on real contract values, and
the gpu-vllm repository's rendering. On a GPU (``pytest -m gpu``, with vLLM installed): the
served gpu-vllm ensembles against the served gpu-hf ones (the transformers engine) on the
tiny-gpu bundle, per-request seeds, and stop.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from build_engines.render import load_repository_configs, render_repository
from mmtriton.llm.generation import GenerationRequest
from mmtriton.media.samples import encode_image, synthetic_image
from mmtriton.spec import SpecError
from mmtriton.llm.vllm_engine import OutputFilter, sampling_kwargs

if TYPE_CHECKING:
    from mmtriton.serving.server import TritonServer

ROOT = Path(__file__).resolve().parents[1]


def test_contract_defaults_are_greedy_and_end_on_end_id() -> None:
    kwargs = sampling_kwargs(GenerationRequest(input_ids=[1, 2], max_new_tokens=8, end_id=6), [1])
    assert kwargs == {"max_tokens": 8, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": None, "stop_token_ids": [6]}


def test_sampling_values_and_seed_pass_through() -> None:
    request = GenerationRequest(input_ids=[1], max_new_tokens=4, end_id=None, temperature=0.7, top_k=40, top_p=0.9, seed=123)
    kwargs = sampling_kwargs(request, [1, 2])
    assert kwargs == {
        "max_tokens": 4, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "seed": 123, "stop_token_ids": [1, 2]
    }


def test_ignore_eos_runs_to_max_tokens() -> None:
    kwargs = sampling_kwargs(GenerationRequest(input_ids=[1], max_new_tokens=4, end_id=-1), [1])
    assert kwargs["ignore_eos"] is True and "stop_token_ids" not in kwargs


def test_output_filter_drops_the_end_id_and_keeps_stop_words() -> None:
    ends = OutputFilter(frozenset({6}))
    assert ends.push([3, 4]) == [3, 4] and not ends.done
    assert ends.push([5, 6, 7]) == [5] and ends.done
    stops = OutputFilter(frozenset({6}), [[8, 9]])
    assert stops.push([8]) == [8] and not stops.done
    assert stops.push([9, 10]) == [9] and stops.done and stops.output == [8, 9]


def test_gpu_vllm_repository_renders_and_names_its_engine(bundle_dir: Path, tmp_path: Path) -> None:
    repo = render_repository(bundle_dir, tmp_path / "repo-gpu-vllm", "gpu-vllm")
    configs = load_repository_configs(repo)
    params = {k: v.string_value for k, v in configs["tensorrt_llm"].parameters.items()}
    assert params["engine"] == "vllm" and params["vocab_size"] == str(json.loads((bundle_dir / "bundle.json").read_text())["vocab_size"])
    assert params["enforce_eager"] == "false" and params["tensor_parallel_size"] == "1"
    cpu = {k: v.string_value for k, v in load_repository_configs(render_repository(bundle_dir, tmp_path / "cpu", "cpu"))["tensorrt_llm"].parameters.items()}
    assert cpu["engine"] == "transformers" and "max_model_len" not in cpu


def test_gpu_vllm_pins_its_gpu_models_to_gpu_0(bundle_dir: Path, tmp_path: Path) -> None:
    """At TP=2 vLLM's second rank owns GPU 1: DALI and the encoders must not get instances there."""
    configs = load_repository_configs(
        render_repository(bundle_dir, tmp_path / "repo", "gpu-vllm", overrides={"serving.tensor_parallel_size": "2"})
    )
    gpu_models = {
        name: [list(g.gpus) for g in config.instance_group]
        for name, config in configs.items()
        if any(g.kind == g.KIND_GPU for g in config.instance_group)
    }
    assert set(gpu_models) == {"image_preprocess", "audio_preprocess", "vision_encoder", "audio_encoder"}
    assert all(groups == [[0]] for groups in gpu_models.values()), gpu_models
    cpu = load_repository_configs(render_repository(bundle_dir, tmp_path / "cpu", "cpu"))
    assert all(not g.gpus for config in cpu.values() for g in config.instance_group)


def test_gpu_vllm_engine_settings_come_from_the_spec(bundle_dir: Path, tmp_path: Path) -> None:
    overrides = {
        "serving.tensor_parallel_size": "2",
        "serving.gpu_memory_utilization": "0.7",
        "serving.enforce_eager": "true",
        "serving.enable_prefix_caching": "false",
        "serving.stream_chunk_rate": "0",
        "serving.max_batch_size": "5",
    }
    repo = render_repository(bundle_dir, tmp_path / "repo", "gpu-vllm", overrides=overrides)
    config = load_repository_configs(repo)["tensorrt_llm"]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert (params["tensor_parallel_size"], params["gpu_memory_utilization"]) == ("2", "0.7")
    assert (params["enforce_eager"], params["enable_prefix_caching"], params["stream_chunk_rate"]) == ("true", "false", "0")
    assert config.max_batch_size == 5  # vLLM's max_num_seqs
    # What the served model and the in-process anchor hand vLLM, typed.
    from mmtriton.llm.vllm_engine import engine_settings

    assert engine_settings(params, config.max_batch_size) == {
        "max_num_seqs": 5, "max_model_len": int(params["max_model_len"]), "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.7, "enforce_eager": True, "enable_prefix_caching": False,
    }
    with pytest.raises(SpecError, match="tensor_parallel_size"):
        render_repository(bundle_dir, tmp_path / "bad", "gpu-vllm", overrides={"serving.tensor_parallel_size": "0"})


# ----------------------------------------------------------------------------- on a GPU

@pytest.fixture(scope="module")
def gpu_bundle(request: pytest.FixtureRequest) -> Path:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("vllm")
    return request.getfixturevalue("tiny_gpu_bundle")  # built only where the GPU tests run


def _server(repo: Path, work: Path) -> "TritonServer":

    from tests.helpers.servers import make_server

    return make_server(repo, work, ready_timeout_s=600).start()


@pytest.fixture(scope="module")
def servers(gpu_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    base = tmp_path_factory.mktemp("vllm")
    vllm = _server(render_repository(gpu_bundle, base / "repo-gpu-vllm", "gpu-vllm"), base / "srv-vllm")
    try:
        hf = _server(render_repository(gpu_bundle, base / "repo-gpu-hf", "gpu-hf"), base / "srv-hf")
        try:
            yield {"vllm": vllm, "hf": hf}
        finally:
            hf.stop()
    finally:
        vllm.stop()


@pytest.mark.gpu
def test_served_vllm_matches_the_transformers_engine(servers: dict) -> None:
    from tests.helpers.servers import greedy_answers

    results = greedy_answers(servers["hf"], servers["vllm"], ("hf", "vllm"))
    print(json.dumps(results))
    for name, r in results.items():
        assert r["n"] == 32, (name, r)
        assert r["hf"] == r["vllm"], (name, r)


@pytest.mark.gpu
def test_vllm_seed_reproduces_sampling(servers: dict) -> None:
    from clients.llm import ChatClient, Sampling

    client = ChatClient(servers["vllm"].grpc_url)

    def sample(seed: int) -> list[int]:
        return client.generate("Tell me a story.", sampling=Sampling(max_tokens=24, temperature=1.0, top_k=50, seed=seed, ignore_eos=True)).token_ids

    first, again, other = sample(7), sample(7), sample(8)
    assert first == again
    assert first != other


def _engine_metric(server: "TritonServer", name: str) -> float:
    import urllib.request

    from bench.triton_stats import parse_metrics

    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        values = parse_metrics(resp.read().decode())
    key = f'mmtriton_engine_{name}{{model="tensorrt_llm"}}'
    assert key in values, f"no {key} on /metrics"
    return values[key]


def _in_flight(server: "TritonServer") -> float:
    return _engine_metric(server, "requests_in_flight")


def _wait_idle(server: "TritonServer", deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while _in_flight(server) != 0:
        assert time.monotonic() < end, "vLLM requests still in flight"
        time.sleep(0.2)


@pytest.mark.gpu
def test_vllm_concurrent_streams_each_equal_their_own_reference(servers: dict) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from clients.llm import ChatClient, Sampling

    client = ChatClient(servers["vllm"].grpc_url)
    image = encode_image(synthetic_image(320, 240, seed=9), "JPEG")
    jobs = [(f"Question number {i}: " + "why? " * (i % 5), image if i % 4 == 0 else None, 8 + i) for i in range(16)]

    def run(job: tuple) -> list[int]:
        prompt, img, n = job
        return client.generate(prompt, image=img, sampling=Sampling(max_tokens=n, ignore_eos=True)).token_ids

    server = servers["vllm"]

    def batch_counters() -> tuple[float, float]:
        time.sleep(0.6)  # the model publishes the engine's counters every 0.2 s
        return _engine_metric(server, "steps_total"), _engine_metric(server, "step_sequences_total")

    start = batch_counters()
    alone = [run(job) for job in jobs]
    middle = batch_counters()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, jobs))
    end = batch_counters()
    assert together == alone
    # vLLM's own step statistics reach /metrics: one request at a time is one sequence per
    # step; 16 at once share steps.
    alone_mean = (middle[1] - start[1]) / (middle[0] - start[0])
    together_mean = (end[1] - middle[1]) / (end[0] - middle[0])
    print(json.dumps({"mean_batch_alone": alone_mean, "mean_batch_together": together_mean}))
    assert 0.9 <= alone_mean <= 1.1
    assert together_mean > 2.0
    assert _engine_metric(server, "step_batch_size_max") >= 8


@pytest.mark.gpu
def test_vllm_closed_stream_and_stop_free_the_slot(servers: dict) -> None:
    import uuid

    from clients.llm import ChatClient, Sampling

    server = servers["vllm"]
    client = ChatClient(server.grpc_url)
    longest = Sampling(max_tokens=256, ignore_eos=True)
    _wait_idle(server)
    cancelled = _engine_metric(server, "requests_cancelled_total")
    stream = client.stream("Tell me everything.", sampling=longest)
    next(stream)
    stream.close()  # the gRPC stream is cancelled; postprocessing stops the vLLM request
    _wait_idle(server)
    time.sleep(0.5)  # the counter is reported every 0.2 s
    assert _engine_metric(server, "requests_cancelled_total") == cancelled + 1
    rid = uuid.uuid4().hex
    worker = threading.Thread(target=lambda: client.generate("Go on.", sampling=longest, request_id=rid))
    worker.start()
    end = time.monotonic() + 30
    while _in_flight(server) == 0:
        assert time.monotonic() < end, "the request never started"
        time.sleep(0.05)
    client.stop(rid)
    worker.join(60)
    assert not worker.is_alive()
    _wait_idle(server)
    time.sleep(0.5)
    assert _engine_metric(server, "requests_cancelled_total") == cancelled + 2
    assert len(client.generate("Hello", sampling=Sampling(max_tokens=4)).token_ids) >= 1


def test_coalesce_joins_waiting_tokens_and_stops_at_the_end_marker() -> None:
    import queue

    from mmtriton.llm.generation import coalesce

    items: queue.SimpleQueue = queue.SimpleQueue()
    for item in ([2], [3, 4], "END", [9]):
        items.put(item)
    assert coalesce([1], items) == ([1, 2, 3, 4], "END")
    assert coalesce([8], items) == ([8, 9], None)


def _paced(produce, gap: float) -> list[tuple[float, list[int]]]:
    """Run ``produce(queue)`` in a thread and collect (arrival time, chunk) from a paced token_stream."""
    import queue

    from mmtriton.llm.generation import token_stream

    items: queue.SimpleQueue = queue.SimpleQueue()
    producer = threading.Thread(target=produce, args=(items,))
    producer.start()
    chunks = [(time.monotonic(), chunk) for chunk in token_stream(items, items.get, [], lambda: gap)]
    producer.join(10)
    return chunks


def test_paced_stream_keeps_chunks_apart_without_losing_or_delaying_tokens() -> None:
    from mmtriton.llm.generation import STREAM_END

    started: list[float] = []

    def produce(items) -> None:
        started.append(time.monotonic())
        for token in range(60):
            items.put([token])
            time.sleep(0.002)
        items.put(STREAM_END)

    gap = 0.025
    chunks = _paced(produce, gap)
    assert [t for _, chunk in chunks for t in chunk] == list(range(60))  # all tokens, in order
    assert chunks[0][1] == [0]  # the first token is not held back for company
    gaps = np.diff([at for at, _ in chunks])
    # Each chunk after the first waits out the gap (1 ms for the clock's granularity), except
    # the last, which leaves when the request ends; a chunk carries the tokens of its gap, so
    # there are far fewer chunks than tokens.
    assert gaps[:-1].min() >= gap - 0.001, gaps
    assert len(chunks) < 60 / 3


def test_paced_stream_sends_the_last_tokens_as_soon_as_the_request_ends() -> None:
    from mmtriton.llm.generation import STREAM_END

    def produce(items) -> None:
        items.put([1])
        time.sleep(0.05)
        items.put([2])
        items.put(STREAM_END)

    begin = time.monotonic()
    chunks = _paced(produce, gap=30.0)
    # Without the early end, the second chunk would wait out the 30 s gap.
    assert [chunk for _, chunk in chunks] == [[1], [2]]
    assert chunks[-1][0] - begin < 10.0
