"""The Kubernetes deployment's behaviour against real servers and stand-ins (the rest of ``tests/test_k8s.py``).

- Autoscaling: the HPA's metric is made by the prometheus-adapter rule; the rule's source
  metric is on the real CPU server's ``/metrics``; the rule's query, evaluated by
  ``promtool`` on counters the real server produced, gives requests in flight per pod.
- The liveness probe command, as written in the manifest, passes against a healthy real
  server and fails within its timeout when inference is wedged (a stub stopped with SIGSTOP).
- gRPC balancing: the front door's client reaches Triton through a ``dns:///`` target; streams
  spread over several worker addresses only with round_robin (stand-in workers on loopback).
- ``tools/k8s_capacity.py`` against an independent computation.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import probe_server, stub_pid
from tests.k8s_checks import (
    DASHBOARD,
    DASHBOARD_COPY,
    REPORT,
    OVERLAY_SPECS,
    adapter_rules,
    K8S,
    OVERLAYS,
    ROOT,
    arg,
    container,
    container_ports,
    find,
    render,
    selects,
)
from tools import k8s_capacity




# --- autoscaling -------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_hpa_metric_comes_from_the_adapter_rule_and_scales_down_slowly(overlay: str) -> None:
    objs = render(overlay)
    hpa = find(objs, "HorizontalPodAutoscaler", "triton-worker")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton-worker"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    names = {rule["name"]["as"] for rule in adapter_rules(objs)}
    assert metric["pods"]["metric"]["name"] in names
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600
    assert all(p["type"] == "Pods" and p["value"] == 1 and p["periodSeconds"] >= 300 for p in down["policies"])
    # The target is the capacity calculation's for the annotated P99 and utilization.
    notes = hpa["metadata"]["annotations"]
    planned = k8s_capacity.plan(
        1.0,
        float(notes["mmtriton.io/p99-target-s"]),
        k8s_capacity.load_levels(REPORT),
        float(notes["mmtriton.io/utilization"]),
    )
    assert int(metric["pods"]["target"]["averageValue"]) == planned.hpa_in_flight_target
    door = find(objs, "HorizontalPodAutoscaler", "openai-frontdoor")
    assert door["spec"]["scaleTargetRef"]["name"] == "openai-frontdoor"
    assert [m["resource"]["name"] for m in door["spec"]["metrics"]] == ["cpu"]
    assert "cpu" in container(find(objs, "Deployment", "openai-frontdoor"), "openai")["resources"]["requests"]


def test_adapter_rule_source_metric_is_on_the_real_servers_metrics(cpu_server_metric_names: set[str]) -> None:
    for rule in adapter_rules(render("vllm-1gpu")):
        source = re.match(r"^([A-Za-z_:][A-Za-z0-9_:]*)\{", rule["seriesQuery"]).group(1)
        assert source in cpu_server_metric_names, source
        assert re.fullmatch(rule["name"]["matches"].strip("^$"), source)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def _scrape(url: str) -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    values = {}
    for name, model, value in re.findall(r'^(nv_inference_\w+)\{model="(\w+)",version="1"\} (\S+)$', text, flags=re.M):
        values[(name, model)] = float(value)
    return values


def _stream_seconds(client, prompt: str) -> tuple[float, float]:  # noqa: ANN001
    """(whole time the client waited, time from its first chunk to its last) of one streamed answer."""
    from clients.llm import Sampling

    start = time.monotonic()
    stamps = [time.monotonic() for _ in client.stream(prompt, sampling=Sampling(max_tokens=200, ignore_eos=True))]
    assert len(stamps) > 2
    return time.monotonic() - start, stamps[-1] - stamps[0]


def test_adapter_query_gives_requests_in_flight_per_pod(server, tmp_path: Path) -> None:  # noqa: ANN001
    """The rule's query, evaluated by promtool on what the real server counted, is the mean concurrency."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool (Debian package prometheus) is not installed; .ci/run installs it")
    (rule,) = adapter_rules(render("vllm-1gpu"))
    source = "nv_inference_request_duration_us"
    from clients.llm import ChatClient, Sampling

    clients = [ChatClient(server.grpc_url) for _ in range(4)]
    for client in clients:  # connected and warm before the measured window
        list(client.stream("warm up", sampling=Sampling(max_tokens=2)))
    before = _scrape(server.metrics_url)
    with ThreadPoolExecutor(4) as pool:
        took, spans = zip(*pool.map(lambda i: _stream_seconds(clients[i], f"story number {i}"), range(4)))
    after = _scrape(server.metrics_url)
    chat = {m for (n, m) in after if n == source and m.startswith("chat_")}
    counted_s = sum(after[(source, m)] - before.get((source, m), 0.0) for m in chat) / 1e6
    # Triton counts each stream's whole time on its ensemble: at least from first to last chunk, at
    # most what the clients waited.
    assert sum(spans) <= counted_s <= sum(took), (counted_s, spans, took)
    llm_s = (after[(source, "tensorrt_llm")] - before[(source, "tensorrt_llm")]) / 1e6
    # The decoupled LLM model's own duration ends at hand-off to its engine: why the rule reads the ensembles.
    assert llm_s < 0.5 * counted_s, (llm_s, counted_s)

    # Two pods: one with the measured growth every 30 s, one with twice that; plus non-chat series.
    step_us = counted_s * 1e6
    series = []
    for pod, factor in (("worker-a", 1), ("worker-b", 2)):
        labels = f'namespace="mmtriton",pod="{pod}",version="1"'
        series.append({"series": f'{source}{{{labels},model="chat_text"}}', "values": f"0+{step_us * factor:.0f}x20"})
        series.append({"series": f'{source}{{{labels},model="tensorrt_llm"}}', "values": "0+99000000x20"})
    other = f'{source}{{namespace="other",pod="worker-a",version="1",model="chat_text"}}'
    series.append({"series": other, "values": "0+5e9x20"})
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", source)
        .replace("<<.LabelMatchers>>", 'namespace="mmtriton",pod=~"worker-a|worker-b"')
        .replace("<<.GroupBy>>", "pod")
    )
    # promtool compares floats exactly: compare inside PromQL instead, within 1e-9 requests.
    expected = {pod: counted_s * factor / 30.0 for pod, factor in (("worker-a", 1), ("worker-b", 2))}

    def check(values: dict[str, float]) -> str:
        wanted = " or ".join(f'label_replace(vector({v!r}), "pod", "{pod}", "", "")' for pod, v in values.items())
        return f"abs(({query}) - on(pod) ({wanted})) < bool 1e-9"

    ones = [{"labels": f'{{pod="{pod}"}}', "value": 1} for pod in expected]
    tests = {
        "rule_files": [],
        "evaluation_interval": "30s",
        "tests": [
            {
                "interval": "30s",
                "input_series": series,
                "promql_expr_test": [{"expr": check(expected), "eval_time": "5m", "exp_samples": ones}],
            }
        ],
    }
    path = tmp_path / "adapter_test.yml"
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    # The same file with a wrong expectation fails: promtool really compared.
    tests["tests"][0]["promql_expr_test"][0]["expr"] = check({pod: v * 1.01 for pod, v in expected.items()})
    path.write_text(yaml.safe_dump(tests))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0


# --- monitoring ----------------------------------------------------------------------------------------


def test_dashboard_copy_is_the_compose_dashboard_byte_for_byte() -> None:
    """deploy/k8s/monitoring/triton.json never drifts from the file compose's Grafana loads."""
    assert DASHBOARD_COPY.read_bytes() == DASHBOARD.read_bytes(), (
        "the copy differs: cp monitoring/grafana/dashboards/triton.json deploy/k8s/monitoring/"
    )
    kustomization = yaml.safe_load((K8S / "monitoring" / "kustomization.yaml").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == [DASHBOARD_COPY.name]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_is_the_compose_dashboard(overlay: str) -> None:
    objs = render(overlay)
    config = find(objs, "ConfigMap", "mmtriton-grafana-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["data"] == {"triton.json": DASHBOARD.read_text()}
    monitors = {o["metadata"]["name"]: o for o in objs if o["kind"] == "PodMonitor"}
    assert monitors["triton-worker"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitors["openai-frontdoor"]["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"
    assert monitors["openai-frontdoor"]["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


# --- liveness ---------------------------------------------------------------------------------------------


def test_liveness_probe_command_fails_within_its_timeout_on_a_wedged_server(cpu_repo: Path, tmp_path: Path) -> None:
    """The manifest's exec command (python3 -> this interpreter, --url -> this server) on a server of its own."""
    probe = container(find(render("trtllm-tp2"), "Deployment", "triton-worker"), "triton")["livenessProbe"]
    for overlay in ("vllm-1gpu", "vllm-tp2"):
        assert container(find(render(overlay), "Deployment", "triton-worker"), "triton")["livenessProbe"] == probe
    command = list(probe["exec"]["command"])
    timeout_s = probe["timeoutSeconds"]
    assert command[0] == "python3"

    def run(url: str) -> tuple[int, float, str]:
        argv = [sys.executable, *command[1:]]
        argv[argv.index("--url") + 1] = url
        start = time.monotonic()
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s + 30)
        return proc.returncode, time.monotonic() - start, proc.stderr

    srv = probe_server(cpu_repo, tmp_path / "server")
    with srv:
        code, took, err = run(srv.grpc_url)
        assert code == 0, err
        assert took < timeout_s
        os.kill(stub_pid(srv, "image_preprocess"), signal.SIGSTOP)  # this server's own stub, by its pid
        assert srv.is_ready(), "readiness still says ready: why liveness runs real inference"
        code, took, err = run(srv.grpc_url)
        assert code == 1, err
        assert "not live" in err
        assert took < timeout_s, f"the probe took {took:.1f} s; Kubernetes gives it {timeout_s} s"


# --- gRPC balancing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_front_door_targets_the_headless_worker_service(overlay: str) -> None:
    objs = render(overlay)
    args = container(find(objs, "Deployment", "openai-frontdoor"), "openai")["args"]
    url = arg(args, "--triton-url")
    match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", url)
    assert match, url
    svc = find(objs, "Service", match.group(1))
    assert svc["spec"]["clusterIP"] == "None", "a ClusterIP Service would pin each front door to one worker"
    worker = find(objs, "Deployment", "triton-worker")
    assert selects({"matchLabels": svc["spec"]["selector"]}, worker["spec"]["template"]["metadata"]["labels"])
    (port,) = svc["spec"]["ports"]
    assert port["port"] == int(match.group(2))
    assert container_ports(container(worker, "triton"))[port["targetPort"]] == 8001
    _, spec_name, _ = OVERLAY_SPECS[overlay]
    assert arg(args, "--bundle") == f"/workspace/build/bundles/{spec_name}"


def test_front_door_client_reaches_triton_through_a_dns_target(server) -> None:  # noqa: ANN001
    """TritonChat and the /health probe accept the dns:/// form the manifests give."""
    from clients.llm import Sampling, request_values
    from mmtriton.serving.probe import probe
    from openai_frontend.triton import TritonChat

    port = server.grpc_url.rsplit(":", 1)[1]
    url = f"dns:///localhost:{port}"

    async def chat() -> int:
        client = TritonChat(url)
        try:
            values = request_values("hello", None, None, Sampling(max_tokens=4), stream=True)
            return len([chunk async for chunk in client.stream("chat_text", values, "k8s-dns-1")])
        finally:
            await client.close()

    assert asyncio.run(asyncio.wait_for(chat(), 60)) >= 1
    assert probe(url, 10.0) < 20.0


def _spread(options: list[tuple[str, object]], requests: int = 8) -> list[int]:
    """Requests each of two stand-in workers got from TritonChat with these channel options."""
    from openai_frontend import triton as door
    from tests.k8s_grpc_stub import start_workers

    workers = start_workers(["127.0.0.1", "127.0.0.2"])
    target = "ipv4:" + ",".join(f"{w.address}:{w.port}" for w in workers)  # the headless Service's A records
    saved = door._CHANNEL_OPTIONS
    door._CHANNEL_OPTIONS = options

    async def send() -> None:
        client = door.TritonChat(target)
        try:
            for i in range(requests):
                values = {"text_input": np.array([[b"x"]], dtype=np.object_)}
                got = [c async for c in client.stream("chat_text", values, f"r{i}")]
                assert got == []  # only the empty final response
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(send(), 60))
        return [w.count for w in workers]
    finally:
        door._CHANNEL_OPTIONS = saved
        for worker in workers:
            worker.stop()


def test_streams_spread_over_worker_pods_only_with_round_robin() -> None:
    """pick_first (gRPC's default) pins a channel to one address; round_robin spreads every stream."""
    from openai_frontend import triton as door

    current = list(door._CHANNEL_OPTIONS)
    pick_first = [o for o in current if o[0] != "grpc.lb_policy_name"]
    round_robin = [*pick_first, ("grpc.lb_policy_name", "round_robin")]
    # round_robin uses every address once its connection is ready: the first stream or two may
    # go to the address that connected first, then they alternate.
    spread = _spread(round_robin)
    assert sum(spread) == 8 and min(spread) >= 3, spread
    assert sorted(_spread(pick_first)) == [0, 8]
    # What the front door does (docs/kubernetes.md, "gRPC balancing", says which).
    assert ("grpc.lb_policy_name", "round_robin") in current
    assert min(_spread(current)) >= 3
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    assert "round_robin is on" in docs


# --- capacity -------------------------------------------------------------------------------------------------


def _independent(qps: float, p99_s: float, utilization: float) -> tuple[float, float, int, int]:
    """Brute force over a fine concurrency grid with numpy's interpolation."""
    data = json.loads(REPORT.read_text())
    served = sorted((lv["concurrency"], lv["served"]["p99_s"], lv["served"]["req_s"]) for lv in data["levels"])
    cs, p99, rps = (np.array(x, dtype=float) for x in zip(*served))
    grid = np.linspace(cs[0], cs[-1], 630001)
    ok = grid[np.interp(grid, cs, p99) <= p99_s + 1e-12]
    c = float(ok.max())
    per = float(np.interp(c, cs, rps))
    replicas = 1
    while replicas * per * utilization < qps - 1e-9:
        replicas += 1
    return c, per, replicas, max(1, int(c * utilization + 1e-9))


@pytest.mark.parametrize(
    ("qps", "p99_s", "utilization"),
    [(100, 2.5, 0.8), (100, 2.1, 0.8), (40, 3.0, 0.7), (500, 4.0, 0.9), (5, 1.9, 1.0), (16.3, 2.07, 1.0)],
)
def test_capacity_matches_an_independent_computation(qps: float, p99_s: float, utilization: float) -> None:
    got = k8s_capacity.plan(qps, p99_s, k8s_capacity.load_levels(), utilization)
    c, per, replicas, target = _independent(qps, p99_s, utilization)
    assert got.concurrency == pytest.approx(c, abs=2e-4)
    assert got.replica_req_s == pytest.approx(per, rel=1e-4)
    assert (got.replicas, got.hpa_in_flight_target) == (replicas, target)


def test_capacity_cli_and_limits(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.k8s_capacity", "--qps", "100", "--p99-s", "2.5"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )
    result = json.loads(out.stdout)
    # By hand: P99 2.07 s at c=32 and 3.17 s at c=64 -> c = 32 + 32 x 0.43 / 1.10 = 44.5 per replica.
    assert result["concurrency_per_replica"] == pytest.approx(32 + 32 * (2.5 - 2.0676) / (3.1691 - 2.0676), abs=0.05)
    assert result["replicas"] == math.ceil(100 / (result["replica_req_s"] * 0.8))
    with pytest.raises(k8s_capacity.CapacityError, match="below the lowest measured"):
        k8s_capacity.plan(10, 1.0, k8s_capacity.load_levels())
    bad = json.loads(REPORT.read_text())
    bad["levels"][2]["served"]["p99_s"] = 0.1
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(k8s_capacity.CapacityError, match="must not fall"):
        k8s_capacity.load_levels(tmp_path / "bad.json")
