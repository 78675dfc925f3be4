"""The Kubernetes deployment (``deploy/k8s``), checked without a cluster.

- Every overlay renders with plain ``kubectl kustomize`` / ``kubectl apply -k`` (no load
  restrictor flag: no Kustomization reads a file outside its folder) and every object validates offline:
  built-in kinds against the Kubernetes API's JSON schemas (``kubernetes-validate``,
  strict), the ``PodMonitor`` CRD structurally (``tests/k8s_checks.py``).
- The checks the compose files have: GPUs = tensor parallel size (spec, render plan, the
  worker's own start-up check run with stand-in tools), image tags = ``stack.toml``,
  probe / Service / PodMonitor / NetworkPolicy ports = container ports, /dev/shm and
  start-up time like compose, model control off, non-root and read-only root filesystem.
- Autoscaling: the HPA's metric is made by the prometheus-adapter rule; the rule's source
  metric is on the real CPU server's ``/metrics``; the rule's query, evaluated by
  ``promtool`` on counters the real server produced, gives requests in flight per pod;
  the target is what ``tools/k8s_capacity.py`` computes from the H200 measurement.
- The liveness probe command, as written in the manifest, passes against a healthy real
  server and fails within its timeout when inference is wedged (a stub stopped with SIGSTOP).
- gRPC balancing: the front door's URL is the headless Service; its client reaches Triton
  through a ``dns:///`` target; streams spread over several worker addresses only with
  gRPC's round_robin policy (stand-in workers on loopback addresses).
- ``tools/k8s_capacity.py`` against an independent computation.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from build_engines.render import PROFILES, python_engine_parameters, render_repository, verify_repository
from mmtriton.serving import tp_launcher
from mmtriton.spec import load_spec
from tests.k8s_checks import (
    STACK,
    SPECS,
    COMPOSE,
    OVERLAY_SPECS,
    NAMESPACE_LABELS,
    MONITORING_LABELS,
    TRITON_EXIT_TIMEOUT_S,
    workloads,
    quantity_bytes,
    K8S,
    OVERLAYS,
    ROOT,
    arg,
    check_podmonitor,
    container,
    container_ports,
    find,
    ingress_allowed,
    kubectl,
    pod_spec,
    render,
    selects,
    validate_builtin,
    validator,
)


# --- rendering and schema validation -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object(overlay: str) -> None:
    objs = render(overlay)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {
        ("Namespace", "mmtriton"),
        ("PersistentVolumeClaim", "mmtriton-build"),
        ("Job", "build-repository"),
        ("Deployment", "triton-worker"),
        ("Service", "triton"),
        ("Service", "triton-grpc"),
        ("PodDisruptionBudget", "triton-worker"),
        ("HorizontalPodAutoscaler", "triton-worker"),
        ("Deployment", "openai-frontdoor"),
        ("Service", "openai"),
        ("HorizontalPodAutoscaler", "openai-frontdoor"),
        ("PodDisruptionBudget", "openai-frontdoor"),
        ("PodMonitor", "triton-worker"),
        ("PodMonitor", "openai-frontdoor"),
        ("NetworkPolicy", "default-deny-ingress"),
        ("NetworkPolicy", "triton-worker-ingress"),
        ("NetworkPolicy", "openai-frontdoor-ingress"),
        ("ConfigMap", "mmtriton-prometheus-adapter-rules"),
        ("ConfigMap", "mmtriton-grafana-dashboard"),
    }
    assert kinds == expected
    assert len(kinds) == len(objs), "an object is rendered twice"
    monitoring = {o["metadata"]["name"] for o in objs if o["metadata"].get("namespace") == "monitoring"}
    assert monitoring == {"mmtriton-prometheus-adapter-rules", "mmtriton-grafana-dashboard"}
    for obj in objs:
        if obj["kind"] != "Namespace" and obj["metadata"]["name"] not in monitoring:
            assert obj["metadata"]["namespace"] == "mmtriton", obj["metadata"]["name"]
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert "overlay-sets" not in json.dumps(obj), f"{name} keeps a base placeholder"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_offline(overlay: str) -> None:
    kv = validator()
    problems = []
    for obj in render(overlay):
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "PodMonitor":
            problems += [f"{name}: {p}" for p in check_podmonitor(obj)]
            continue
        try:
            validate_builtin(obj)
        except kv.utils.SchemaNotFoundError as err:
            problems.append(f"{name}: {err.message}")
        except Exception as err:  # noqa: BLE001 - jsonschema's error, with its path
            problems.append(f"{name}: {'.'.join(map(str, getattr(err, 'path', [])))}: {getattr(err, 'message', err)}")
    assert not problems, "\n".join(problems)


def test_the_validators_reject_broken_objects() -> None:
    objs = render("vllm-1gpu")
    worker = copy.deepcopy(find(objs, "Deployment", "triton-worker"))
    validate_builtin(worker)
    typo = copy.deepcopy(worker)
    next(v for v in pod_spec(typo)["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimt"] = "8Gi"
    wrong_type = copy.deepcopy(worker)
    container(wrong_type, "triton")["livenessProbe"]["periodSeconds"] = "30s"
    for broken in (typo, wrong_type):
        with pytest.raises(Exception, match=r"sizeLimt|'30s' is not of type 'integer'"):
            validate_builtin(broken)
    monitor = copy.deepcopy(find(objs, "PodMonitor", "triton-worker"))
    assert check_podmonitor(monitor) == []
    monitor["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    monitor["spec"]["podMetricsEndpoints"][0]["scrapeTimeout"] = "ten seconds"
    del monitor["spec"]["selector"]
    assert check_podmonitor(monitor) == ["spec.selector: required"]
    monitor["spec"]["selector"] = {"matchLabels": {"a": "b"}}
    assert check_podmonitor(monitor) == [
        "spec.podMetricsEndpoints[0].intervall: unknown field",
        "spec.podMetricsEndpoints[0].scrapeTimeout: not a duration",
    ]


def test_kustomize_refuses_a_broken_overlay(tmp_path: Path) -> None:
    broken = tmp_path / "overlay"
    broken.mkdir()
    base = os.path.relpath(K8S / "base", broken)
    (broken / "kustomization.yaml").write_text(f"resources:\n  - {base}\npatches:\n  - path: missing.yaml\n")
    result = subprocess.run([kubectl(), "kustomize", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "missing.yaml" in result.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _apply_k(folder: Path, tmp_path: Path) -> tuple[str, str]:
    """(stderr, API server address) of ``kubectl apply -k folder --dry-run=client`` with no cluster.

    kubectl builds the Kustomization before it calls the server: a folder that builds fails only
    when it connects (the error names the address); one that needs a load restrictor fails before.
    """
    server = f"127.0.0.1:{_closed_port()}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "none", "cluster": {"server": f"https://{server}", "insecure-skip-tls-verify": True}}],
        "users": [{"name": "none", "user": {"token": "none"}}],
        "contexts": [{"name": "none", "context": {"cluster": "none", "user": "none"}}],
        "current-context": "none",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    argv = [kubectl(), "apply", "-k", str(folder), "--dry-run=client", "--validate=false", "-o", "name",
            "--cache-dir", str(tmp_path / "cache")]
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig")}
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0, "no API server listens there"
    return result.stderr, server


def test_overlays_are_the_folders_under_overlays() -> None:
    assert sorted(OVERLAYS) == sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_with_plain_kubectl_apply_k(overlay: str, tmp_path: Path) -> None:
    """The operator's command gets past the build: it fails only at the (absent) API server."""
    stderr, server = _apply_k(K8S / "overlays" / overlay, tmp_path)
    assert "is not in or below" not in stderr, stderr
    assert server in stderr, stderr
    assert render(overlay)  # and plain kubectl kustomize (every render of this file is plain)


def test_plain_kubectl_refuses_a_file_outside_the_kustomization(tmp_path: Path) -> None:
    """Shows the two checks above can fail: the old layout (a generator reading ../../../monitoring) fails
    both plain commands; the layout this repository uses now (a copy inside the folder) passes both."""
    (tmp_path / "dashboard.json").write_text('{"title": "t"}\n')
    monitoring = tmp_path / "k8s" / "monitoring"
    overlay = tmp_path / "k8s" / "overlays" / "x"
    monitoring.mkdir(parents=True)
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text("resources:\n  - ../../monitoring\n")

    def write(source: str) -> None:
        (monitoring / "kustomization.yaml").write_text(
            f"configMapGenerator:\n  - name: dashboard\n    files:\n      - triton.json={source}\n"
        )

    def kustomize() -> subprocess.CompletedProcess:
        return subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)

    write("../../dashboard.json")
    result = kustomize()
    assert result.returncode != 0 and "is not in or below" in result.stderr, result.stderr
    stderr, server = _apply_k(overlay, tmp_path)
    assert "is not in or below" in stderr and server not in stderr, stderr

    shutil.copyfile(tmp_path / "dashboard.json", monitoring / "triton.json")
    write("triton.json")
    result = kustomize()
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["data"] == {"triton.json": '{"title": "t"}\n'}
    stderr, server = _apply_k(overlay, tmp_path)
    assert server in stderr, stderr


def test_no_deployment_file_or_guide_asks_for_a_load_restrictor() -> None:
    flag = re.compile(r"load[-_]?restrict", re.IGNORECASE)
    files = [p for p in K8S.rglob("*") if p.is_file()]
    files += [ROOT / "docs" / "kubernetes.md", ROOT / "README.md", ROOT / ".ci" / "run", ROOT / "tests" / "k8s_checks.py"]
    assert [str(p.relative_to(ROOT)) for p in files if flag.search(p.read_text())] == []


# --- GPUs, images, repository, compose parity ------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gpus_equal_tensor_parallel_size(overlay: str, tmp_path: Path) -> None:
    profile, spec_name, _ = OVERLAY_SPECS[overlay]
    objs = render(overlay)
    worker, job = find(objs, "Deployment", "triton-worker"), find(objs, "Job", "build-repository")
    triton = container(worker, "triton")
    gpus = int(triton["resources"]["limits"]["nvidia.com/gpu"])
    assert "nvidia.com/gpu" not in triton["resources"].get("requests", {}) or int(
        triton["resources"]["requests"]["nvidia.com/gpu"]
    ) == gpus
    spec = load_spec(SPECS / f"{spec_name}.toml")
    repo = f"/workspace/build/repo-{profile}-{spec_name}"
    env = {e["name"]: e["value"] for e in triton.get("env", [])}
    assert env["MODEL_REPOSITORY"] == repo
    build = container(job, "build")
    build_text = " ".join(build["command"])
    assert f"--out build/repo-{profile}-{spec_name}" in build_text.replace("\n", " ")
    assert f"--bundle build/bundles/{spec_name}" in build_text
    if profile == "gpu-vllm":
        tp = int(python_engine_parameters(spec, PROFILES["gpu-vllm"], "0")["tensor_parallel_size"])
        assert gpus == tp == spec.serving.tensor_parallel_size
        assert "nvidia.com/gpu" not in build.get("resources", {}).get("limits", {}), "rendering needs no GPU"
    else:
        from build_engines import encoder_io, trtllm_plan
        from tests.helpers.deploy import write_fake_engine, write_identity_onnx

        bundle = tmp_path / "bundle"
        (bundle / "llm").mkdir(parents=True)
        (bundle / "llm" / "config.json").write_text("{}")
        write_identity_onnx(bundle / "vision_encoder" / "model.onnx", encoder_io.VISION_IO)
        write_identity_onnx(bundle / "audio_encoder" / "model.onnx", encoder_io.AUDIO_IO)
        (bundle / "bundle.json").write_text(json.dumps({"spec": spec.to_dict()}))
        plan = trtllm_plan.plan_gpu_build(spec, bundle, tmp_path / "engines")
        command = triton["command"]
        assert command[:3] == ["python3", "-m", "mmtriton.tp_launcher"]
        assert arg(command, "--model-repository") == repo
        given = tp_launcher.given_gpus(arg(command, "--gpus"), env={})
        assert given is not None
        mapping = write_fake_engine(tmp_path / "engine", tp=plan.llm.tp_size, pp=plan.llm.pp_size)
        from mmtriton.serving import engine_folder

        world = engine_folder.read_engine_mapping(mapping).world_size
        assert gpus == len(given) == plan.llm.world_size == world == 2
        tp_launcher.check_world_size(engine_folder.read_engine_mapping(mapping), given, mapping)
        assert int(build["resources"]["limits"]["nvidia.com/gpu"]) == plan.llm.world_size
        assert f"--spec build_engines/specs/{spec_name}.toml" in build_text


def _fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def tiny_gpu_vllm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from build_engines.bundle import build_bundle

    spec = load_spec(SPECS / "tiny-gpu.toml")
    build = Path(os.environ.get("MMTRITON_BUILD", ROOT / "build"))
    bundle = build_bundle(spec, build / "bundles" / spec.name)
    return render_repository(bundle, tmp_path_factory.mktemp("k8s-repo") / "repo-gpu-vllm-tiny-gpu", "gpu-vllm")


@pytest.mark.parametrize("visible", [1, 2])
def test_vllm_worker_command_refuses_other_gpu_counts(tiny_gpu_vllm_repo: Path, tmp_path: Path, visible: int) -> None:
    """The vllm-1gpu worker's own command, with stand-in nvidia-smi and tritonserver, on the rendered repository."""
    worker = container(find(render("vllm-1gpu"), "Deployment", "triton-worker"), "triton")
    allocated = int(worker["resources"]["limits"]["nvidia.com/gpu"])
    assert worker["command"][:2] == ["sh", "-c"]
    verify_repository(tiny_gpu_vllm_repo)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "nvidia-smi", "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'\n" for i in range(visible)))
    record = tmp_path / "tritonserver.args"
    _fake_tool(bin_dir, "tritonserver", f'printf "%s\\n" "$@" > {record}\n')
    _fake_tool(bin_dir, "python3", f'exec {sys.executable} "$@"\n')
    script = worker["command"][2].replace("/opt/tritonserver/bin/tritonserver", str(bin_dir / "tritonserver"))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "MODEL_REPOSITORY": str(tiny_gpu_vllm_repo),
    }
    result = subprocess.run(["sh", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if visible == allocated:
        assert result.returncode == 0, result.stderr
        args = record.read_text().splitlines()
        assert f"--model-repository={tiny_gpu_vllm_repo}" in args and "--disable-auto-complete-config" in args
        assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
        assert f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}" in args
        assert not any(a.startswith(("--model-control-mode", "--load-model")) for a in args)
    else:
        assert result.returncode == 2 and not record.exists()
        assert f"has tensor_parallel_size 1 but {visible} GPU(s) are allocated" in result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_match_the_stack_and_compose(overlay: str) -> None:
    profile, _, service = OVERLAY_SPECS[overlay]
    objs = render(overlay)
    trtllm_tag = f"mmtriton-gpu:{STACK.triton.release}-trtllm-{STACK.tensorrt_llm.version}"
    gpu_tag = STACK.vllm.tag if profile == "gpu-vllm" else trtllm_tag
    assert COMPOSE["services"][service]["image"] == gpu_tag
    for name in ("triton-worker", "build-repository"):
        obj = find(objs, "Deployment" if name == "triton-worker" else "Job", name)
        images = {c["image"] for c in pod_spec(obj)["containers"] + pod_spec(obj).get("initContainers", [])}
        assert images == {gpu_tag}, name
    door = find(objs, "Deployment", "openai-frontdoor")
    assert {c["image"] for c in pod_spec(door)["containers"]} == {STACK.openai_frontend.tag}
    assert COMPOSE["services"]["openai"]["image"] == STACK.openai_frontend.tag


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_matches_compose_and_drains(overlay: str) -> None:
    profile, spec_name, service = OVERLAY_SPECS[overlay]
    composed = COMPOSE["services"][service]
    worker = find(render(overlay), "Deployment", "triton-worker")
    spec = pod_spec(worker)
    triton = container(worker, "triton")
    # /dev/shm: memory-backed, sized like compose's shm_size.
    mounts = {m["name"]: m for m in triton["volumeMounts"]}
    assert mounts["shm"]["mountPath"] == "/dev/shm"
    shm = next(v for v in spec["volumes"] if v["name"] == mounts["shm"]["name"])
    assert shm["emptyDir"]["medium"] == "Memory"
    assert quantity_bytes(shm["emptyDir"]["sizeLimit"]) == quantity_bytes(composed["shm_size"])
    # Start-up as long as compose's start_period; readiness on Triton's ready endpoint.
    startup = triton["startupProbe"]
    start_period_s = int(composed["healthcheck"]["start_period"].rstrip("m")) * 60
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start_period_s
    for probe in (startup, triton["readinessProbe"]):
        assert probe["httpGet"]["path"] == "/v2/health/ready"
    # Liveness: compose's real-inference healthcheck command, with room for both requests.
    liveness = triton["livenessProbe"]
    assert ["CMD", *liveness["exec"]["command"]] == composed["healthcheck"]["test"]
    deadline = float(arg(liveness["exec"]["command"], "--deadline-s"))
    assert liveness["timeoutSeconds"] >= 2 * deadline + 5
    # Termination: the preStop sleep, then Triton's exit timeout, within the grace period.
    pre_stop = triton["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert spec["terminationGracePeriodSeconds"] > pre_stop + TRITON_EXIT_TIMEOUT_S + 10
    command = " ".join(triton["command"])
    if profile == "gpu-vllm":
        assert f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}" in command
        environment = {e["name"]: e["value"] for e in triton["env"]}
        assert {k: environment[k] for k in composed["environment"]} == composed["environment"]
    else:
        assert "--exit-timeout" not in command  # the launcher's default, 30 s
    # Model control stays off (Triton's default mode "none": no load/unload through the API).
    assert "--model-control-mode" not in command and "--load-model" not in command
    # The repository volume is read-only to workers; the Job writes it.
    build_mounts = [m for m in triton["volumeMounts"] if m["mountPath"] == "/workspace/build"]
    assert build_mounts and all(m.get("readOnly") for m in build_mounts)
    claim = next(v for v in spec["volumes"] if v["name"] == build_mounts[0]["name"])["persistentVolumeClaim"]
    assert claim["readOnly"] is True
    init = spec["initContainers"][0]
    init_env = {e["name"]: e["value"] for e in init["env"]}
    assert init_env["MODEL_REPOSITORY"] == f"/workspace/build/repo-{profile}-{spec_name}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_runs_unprivileged_with_a_read_only_root(overlay: str) -> None:
    for obj in workloads(render(overlay)):
        spec = pod_spec(obj)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"] + spec.get("initContainers", []):
            ctx = c["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, c["name"]
            assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"], c["name"]
            if c["name"] != "wait-for-repository":
                assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{c['name']}: no writable /tmp"


# --- ports ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probe_service_monitor_and_policy_ports_are_container_ports(overlay: str) -> None:
    objs = render(overlay)
    pods = {}
    for obj in workloads(objs):
        labels = obj["spec"]["template"]["metadata"]["labels"]
        ports: dict = {}
        for c in pod_spec(obj)["containers"]:
            ports |= container_ports(c)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                if "httpGet" in probe:
                    assert probe["httpGet"]["port"] in container_ports(c), f"{c['name']} {kind}"
                elif "exec" in probe and "--url" in probe["exec"]["command"]:
                    host, port = arg(probe["exec"]["command"], "--url").rsplit(":", 1)
                    assert host == "localhost" and int(port) == container_ports(c)["grpc"], f"{c['name']} {kind}"
        pods[obj["metadata"]["name"]] = (labels, ports)
    worker_ports = pods["triton-worker"][1]
    assert {worker_ports[n] for n in ("http", "grpc", "metrics")} == {8000, 8001, 8002}
    assert pods["openai-frontdoor"][1]["http"] == int(STACK.openai_frontend.port)
    door_args = container(find(objs, "Deployment", "openai-frontdoor"), "openai")["args"]
    assert pods["openai-frontdoor"][1]["metrics"] == int(arg(door_args, "--metrics-port"))

    def selected(selector: dict) -> list[dict]:
        return [ports for labels, ports in pods.values() if selects(selector, labels)]

    for svc in (o for o in objs if o["kind"] == "Service"):
        targets = selected({"matchLabels": svc["spec"]["selector"]})
        assert targets, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert all(port["targetPort"] in t for t in targets), f"{svc['metadata']['name']}: {port}"
    for monitor in (o for o in objs if o["kind"] == "PodMonitor"):
        targets = selected(monitor["spec"]["selector"])
        assert targets, monitor["metadata"]["name"]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert all(endpoint["port"] in t for t in targets), monitor["metadata"]["name"]
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        targets = selected(policy["spec"]["podSelector"])
        for rule in policy["spec"].get("ingress", []):
            for port in rule.get("ports", []):
                assert all(port["port"] in t.values() for t in targets), f"{policy['metadata']['name']}: {port}"


# --- network policies -------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_front_door_reaches_inference_and_only_monitoring_reaches_metrics(overlay: str) -> None:
    objs = render(overlay)
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    worker = find(objs, "Deployment", "triton-worker")["spec"]["template"]["metadata"]["labels"]
    door = find(objs, "Deployment", "openai-frontdoor")["spec"]["template"]["metadata"]["labels"]
    job = find(objs, "Job", "build-repository")["spec"]["template"]["metadata"]["labels"]
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    here = NAMESPACE_LABELS["mmtriton"]
    elsewhere = {"kubernetes.io/metadata.name": "default"}

    def allowed(dst: dict, port: int, src: dict, src_ns: dict) -> bool:
        return ingress_allowed(
            policies,
            dst_labels=dst,
            port=port,
            src_labels=src,
            src_namespace_labels=src_ns,
            same_namespace=src_ns == here,
        )

    for port in (8000, 8001):
        assert allowed(worker, port, door, here)
        assert not allowed(worker, port, job, here)
        assert not allowed(worker, port, worker, here)
        assert not allowed(worker, port, prometheus, MONITORING_LABELS)
        assert not allowed(worker, port, {}, elsewhere)
    assert allowed(worker, 8002, prometheus, MONITORING_LABELS)
    assert not allowed(worker, 8002, door, here)
    assert not allowed(worker, 8002, {}, elsewhere)
    assert not allowed(worker, 9000, door, here)
    assert allowed(door, 9000, {}, elsewhere)
    # The front door's metrics have a port of their own (--metrics-port): monitoring only.
    assert allowed(door, 9100, prometheus, MONITORING_LABELS)
    assert not allowed(door, 9100, {}, elsewhere) and not allowed(door, 9100, door, here)
    assert not allowed(door, 8001, {}, elsewhere)
    assert not allowed(job, 8000, door, here)


# --- docs ---------------------------------------------------------------------------------------------------------


def test_guide_names_every_overlay_and_the_apply_command() -> None:
    docs = (ROOT / "docs" / "kubernetes.md").read_text()
    for overlay in OVERLAYS:
        assert f"deploy/k8s/overlays/{overlay}" in docs, overlay
    mentioned = set(re.findall(r"deploy/k8s/overlays/([a-z0-9-]+)", docs))
    assert mentioned <= set(OVERLAYS)
    assert "kubectl apply -k deploy/k8s/overlays/<overlay>" in docs
    assert "kubectl apply -k $O" in docs
    assert "python -m tools.k8s_capacity" in docs
    target = find(render("vllm-1gpu"), "HorizontalPodAutoscaler", "triton-worker")["spec"]["metrics"][0]
    assert f"averageValue {target['pods']['target']['averageValue']}" in docs
