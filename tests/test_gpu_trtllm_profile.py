"""The gpu-trtllm profile's deployment, checked without a GPU: TP launcher, compose, Dockerfile, monitoring.

TensorRT-LLM and the DALI backend cannot run here, so these tests pin what can be
checked on a CPU: the leader-mode ``mpirun`` command line, that a GPU-count mismatch
stops the launcher before it starts anything, that TP size / world size / GPU count
agree across the build plan, the launcher and ``docker-compose.yml``, and that the
compose file, the Prometheus config and the Grafana dashboard are valid (real
validators where installed: ``docker-compose`` and ``promtool`` from Debian's
``docker-compose`` and ``prometheus`` packages). The build plan itself is checked in
``tests/test_gpu_trtllm_build.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from build_engines.stack import load_stack
from build_engines.trtllm_plan import plan_gpu_build
from mmtriton.serving import engine_folder, tp_launcher
from mmtriton.spec import load_spec
from tests.conftest import ROOT
from tests.helpers.deploy import (
    APT_HINT,
    COMPOSE,
    DOCKERFILE,
    TINY_SPEC,
    compose_ports,
    compose_validator,
    prometheus_metric_names,
    write_fake_bundle,
    write_fake_engine,
)

PROMETHEUS = ROOT / "monitoring" / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "triton.json"
GRAFANA_DATASOURCES = ROOT / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "monitoring" / "grafana" / "provisioning" / "dashboards" / "mmtriton.yml"

# Metric families only a GPU server exports, with the label values their docs list.
# nv_gpu_*: triton-inference-server/server docs/user_guide/metrics.md (r26.07), "GPU Metrics"
# (label gpu_uuid). nv_trt_llm_*: triton-inference-server/tensorrtllm_backend README.md (r26.07),
# "Triton Metrics" (the tensorrtllm backend's custom metrics; label model and version as well).
GPU_ONLY_METRICS: dict[str, dict[str, set[str]]] = {
    "nv_gpu_utilization": {},
    "nv_gpu_power_usage": {},
    "nv_gpu_power_limit": {},
    "nv_energy_consumption": {},
    "nv_gpu_memory_total_bytes": {},
    "nv_gpu_memory_used_bytes": {},
    "nv_trt_llm_request_metrics": {"request_type": {"waiting", "context", "scheduled", "max", "active"}},
    "nv_trt_llm_runtime_memory_metrics": {"memory_type": {"pinned", "gpu", "cpu"}},
    "nv_trt_llm_kv_cache_block_metrics": {"kv_cache_block_type": {"fraction", "tokens_per", "used", "free", "max"}},
    "nv_trt_llm_inflight_batcher_metrics": {
        "inflight_batcher_specific_metric": {"micro_batch_id", "generation_requests", "total_context_tokens"}
    },
    "nv_trt_llm_general_metrics": {"general_type": {"iteration_counter", "timestamp"}},
    "nv_trt_llm_disaggregated_serving_metrics": {
        "disaggregated_serving_type": {"kv_cache_transfer_ms", "request_count"}
    },
    "nv_trt_llm_v1_metrics": {
        "v1_specific_metric": {"total_generation_tokens", "empty_generation_slots", "total_context_tokens"}
    },
}

# What the cpu profile's server exports when no scraped list is given (fixture below):
# Triton's per-model request metrics and CPU/pinned-memory metrics (metrics.md, "Inference
# Request Metrics" counters, "CPU Metrics", "Pinned Memory Metrics") and the cpu engine's own.
DOCUMENTED_CPU_METRICS = {
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_pending_request_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "nv_cpu_utilization",
    "nv_cpu_memory_total_bytes",
    "nv_cpu_memory_used_bytes",
    "nv_pinned_memory_pool_total_bytes",
    "nv_pinned_memory_pool_used_bytes",
    "mmtriton_engine_step_batch_size_max",
    "mmtriton_engine_steps_total",
    "mmtriton_engine_step_sequences_total",
    "mmtriton_engine_requests_in_flight",
}

PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "rate", "irate", "increase", "delta",
    "clamp_min", "clamp_max", "abs", "topk", "bottomk", "histogram_quantile",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset"}  # fmt: skip


# --- helpers -----------------------------------------------------------------------------


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects; an unknown function name fails the test."""
    text = re.sub(r"\$__\w+", "1m", expr)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        if text[match.end() :].lstrip().startswith("("):
            assert word in PROMQL_FUNCTIONS, f"unknown PromQL function {word!r} in {expr!r}"
        elif word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


def promql_selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """``(metric, {label: value})`` for every selector with equality matchers."""
    found = []
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        found.append((match.group(1), dict(re.findall(r'([A-Za-z_]\w*)\s*=\s*"([^"]*)"', match.group(2)))))
    return found


def family_known(name: str, allowed: set[str]) -> bool:
    """True for a known family, or a histogram/summary series of one."""
    return name in allowed or any(name == f + suffix for f in allowed for suffix in ("_count", "_sum", "_bucket"))


def dashboard_targets() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every query in the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture
def cpu_metric_names(request: pytest.FixtureRequest) -> set[str]:
    """Metric families the cpu profile's server exports.

    A session fixture ``cpu_server_metric_names`` (e.g. in conftest.py, from the
    running CPU server's ``/metrics`` via :func:`prometheus_metric_names`) is used
    when one exists; otherwise the documented list above.
    """
    try:
        return set(request.getfixturevalue("cpu_server_metric_names"))
    except pytest.FixtureLookupError:
        return set(DOCUMENTED_CPU_METRICS)


# --- TP launcher --------------------------------------------------------------------------------


def test_launcher_command_is_leader_mode(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cmd = tp_launcher.leader_mode_command(2, model_repository=repo, cuda_memory_pool_bytes=123456)
    assert cmd[:2] == ["mpirun", "--allow-run-as-root"]
    contexts: list[list[str]] = [[]]
    for arg in cmd[2:]:
        if arg == ":":
            contexts.append([])
        else:
            contexts[-1].append(arg)
    assert len(contexts) == 2
    for rank, ctx in enumerate(contexts):
        assert ctx[:4] == ["-n", "1", "/opt/tritonserver/bin/tritonserver", f"--model-repository={repo}"]
        assert "--disable-auto-complete-config" in ctx
        assert f"--backend-config=python,shm-region-prefix-name=prefix{rank}_" in ctx
        assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(ctx)
    rank0, rank1 = contexts
    assert "--cuda-memory-pool-byte-size=0:123456" in rank0
    assert not any(a.startswith(("--model-control-mode", "--load-model")) for a in rank0)
    assert rank1[-2:] == ["--model-control-mode=explicit", "--load-model=tensorrt_llm"]
    assert not any(a.startswith("--cuda-memory-pool-byte-size") for a in rank1)

    server = tp_launcher.LeaderModeServer(model_repository=repo, work_dir=tmp_path, world_size=2, gpus=["0", "1"])
    assert server.launch_env() == {"PMIX_MCA_gds": "hash", "CUDA_VISIBLE_DEVICES": "0,1"}


def test_print_command_shows_env_and_mpirun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine = write_fake_engine(tmp_path / "engine", tp=2)
    code = tp_launcher.main(
        ["--model-repository", str(tmp_path / "repo"), "--engine-dir", str(engine), "--gpus", "0,1", "--print-command"]
    )
    line = capsys.readouterr().out.strip()
    assert code == 0
    assert line.startswith("env PMIX_MCA_gds=hash CUDA_VISIBLE_DEVICES=0,1 mpirun --allow-run-as-root -n 1 ")
    assert line.count(" : -n 1 ") == 1


def test_launcher_finds_the_engine_through_the_repository(tmp_path: Path) -> None:
    config = tmp_path / "repo" / "tensorrt_llm" / "config.pbtxt"
    config.parent.mkdir(parents=True)
    config.write_text(
        'name: "tensorrt_llm"\nbackend: "tensorrtllm"\n'
        'parameters: { key: "gpt_model_path" value: { string_value: "/workspace/build/engines/x" } }\n'
    )
    assert tp_launcher.engine_dir_of(tmp_path / "repo") == Path("/workspace/build/engines/x")
    with pytest.raises(
        tp_launcher.LaunchError, match=r"config.pbtxt not found: is .* a rendered gpu-trtllm repository\?"
    ):
        tp_launcher.engine_dir_of(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    ("flag", "cuda_visible", "message"),
    [
        (["--gpus", "0"], None, r"built for world size 2 \(tp_size 2 x pp_size 1\) but 1 GPU\(s\) were given \(0\)"),
        ([], "0,1,2", r"built for world size 2 \(tp_size 2 x pp_size 1\) but 3 GPU\(s\) were given \(0,1,2\)"),
        ([], None, r"needs 2 GPUs \(tp_size 2 x pp_size 1\); say which with --gpus 0,1 or CUDA_VISIBLE_DEVICES"),
    ],
)
def test_gpu_count_mismatch_stops_before_anything_starts(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    flag: list[str],
    cuda_visible: str | None,
    message: str,
) -> None:
    def _must_not_start(*args: object, **kwargs: object) -> None:
        raise AssertionError("mpirun was started despite the mismatch")

    monkeypatch.setattr(subprocess, "Popen", _must_not_start)
    if cuda_visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cuda_visible)
    engine = write_fake_engine(tmp_path / "engine", tp=2)
    code = tp_launcher.main(["--model-repository", str(tmp_path / "repo"), "--engine-dir", str(engine), *flag])
    assert code == 2
    assert re.search("not starting: .*" + message, caplog.text), caplog.text
    assert not (tmp_path / "repo").exists() and not Path("build/server-gpu/tritonserver.log").exists()


def test_server_object_refuses_a_mismatch_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    server = tp_launcher.LeaderModeServer(model_repository=tmp_path, work_dir=tmp_path / "w", world_size=2, gpus=["0"])
    with pytest.raises(tp_launcher.LaunchError, match="1 GPU"):
        server.start()
    assert not (tmp_path / "w").exists()


# --- compose, Dockerfile, stack agreement ----------------------------------------------------------


def test_compose_file_validates() -> None:
    validator = compose_validator()
    if validator is None:
        pytest.fail(f"no compose validator (docker-compose or the docker compose plugin); install: {APT_HINT}")
    env = {k: v for k, v in os.environ.items() if k not in ("SPEC", "SPEC_NAME", "GRAFANA_ADMIN_PASSWORD")}
    args = [*validator, "-f", str(COMPOSE), "--project-directory", str(ROOT), "--profile", "build"]
    args += ["--profile", "monitoring", "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def testcompose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    validator = compose_validator()
    if validator is None:
        pytest.fail(f"no compose validator (docker-compose or the docker compose plugin); install: {APT_HINT}")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("shm_size:", "shm_sise:", 1))
    args = [*validator, "-f", str(broken), "--project-directory", str(ROOT), "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "shm_sise" in result.stderr


def test_tp_size_world_size_and_gpu_count_agree(tmp_path: Path) -> None:
    tiny = load_spec(TINY_SPEC)
    plan = plan_gpu_build(tiny, write_fake_bundle(tmp_path, tiny), tmp_path / "engines")
    services = _compose()["services"]
    counts = {}
    for name in ("triton", "build-engines"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert all("gpu" in d["capabilities"] for d in devices)
        counts[name] = sum(int(d["count"]) for d in devices)
    command = services["triton"]["command"]
    assert command[:3] == ["python3", "-m", "mmtriton.tp_launcher"]
    gpus = tp_launcher.given_gpus(command[command.index("--gpus") + 1], env={})
    assert gpus is not None

    # The engine this plan builds, as trtllm-build would write it.
    engine = write_fake_engine(tmp_path / "engine", tp=plan.llm.tp_size, pp=plan.llm.pp_size)
    mapping = engine_folder.read_engine_mapping(engine)
    assert plan.llm.tp_size * plan.llm.pp_size == mapping.world_size == len(gpus) == counts["triton"] == 2
    assert counts["build-engines"] == plan.llm.world_size
    tp_launcher.check_world_size(mapping, gpus, engine)
    launch = tp_launcher.leader_mode_command(mapping.world_size, model_repository=Path("/r"))
    assert launch.count("-n") == mapping.world_size


def test_images_and_pins_match_the_stack() -> None:
    stack = load_stack()
    dockerfile = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.MULTILINE))
    assert args["TRITON_IMAGE"] == stack.triton.image
    assert args["DALI_SOURCE_IMAGE"] == stack.triton.dali_source_image
    assert "COPY --from=dali_source /opt/tritonserver/backends/dali /opt/tritonserver/backends/dali" in dockerfile
    backends = "/opt/tritonserver/backends"
    assert f"COPY --from=dali_source {backends}/tensorrt {backends}/tensorrt" in dockerfile
    # DALI's wheel folder goes after site-packages (a .pth file), never ahead of it on PYTHONPATH.
    assert f"RUN echo {stack.triton.dali_pythonpath} \\\n" in dockerfile and "triton-dali-backend.pth" in dockerfile
    env_paths = re.findall(r"^ENV PYTHONPATH=(.*)$", dockerfile, flags=re.MULTILINE)
    assert env_paths and not any(stack.triton.dali_pythonpath in p or p.endswith(":$PYTHONPATH") for p in env_paths)
    assert f'"tritonclient[grpc]=={stack.python_packages.tritonclient}"' in dockerfile
    services = _compose()["services"]
    assert services["prometheus"]["image"] == stack.monitoring.prometheus_image
    assert services["grafana"]["image"] == stack.monitoring.grafana_image
    assert services["triton"]["build"]["dockerfile"] == "Dockerfile"
    assert services["build-engines"]["restart"] == "no" and services["build-engines"]["profiles"] == ["build"]
    assert services["triton"]["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert sorted(compose_ports(services["triton"])) == [("127.0.0.1", p, p) for p in (8000, 8001, 8002)]
    # Liveness through real inference: readiness stays 200 while inference is stuck.
    health = services["triton"]["healthcheck"]
    assert health["test"][:4] == ["CMD", "python3", "-m", "mmtriton.probe"]
    deadline = float(health["test"][health["test"].index("--deadline-s") + 1])
    # Two requests of up to `deadline` each, plus the interpreter start, fit in the check's timeout.
    assert float(health["timeout"].rstrip("s")) >= 2 * deadline + 5


# --- monitoring ---------------------------------------------------------------------------------


def test_prometheus_scrapes_triton_and_validates() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert [t for sc in jobs["triton"]["static_configs"] for t in sc["targets"]] == ["triton:8002"]
    # Prometheus scrapes it over the compose network; the host sees it on loopback.
    assert ("127.0.0.1", 8002, 8002) in compose_ports(_compose()["services"]["triton"])
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(f"promtool (Debian package prometheus) not installed; install: {APT_HINT}")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail(f"promtool (Debian package prometheus) not installed; install: {APT_HINT}")
    rules = [
        {"record": f"dashboard:query_{i}", "expr": re.sub(r"\$__\w+", "1m", expr)}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_only_exported_metrics(cpu_metric_names: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    datasource_uid = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"][0]["uid"]
    allowed = cpu_metric_names | set(GPU_ONLY_METRICS)
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource_uid, panel["title"]
        for target in panel["targets"]:
            names = promql_metric_names(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            unknown = sorted(n for n in names if not family_known(n, allowed))
            assert not unknown, (
                f"{panel['title']}: {unknown} are not exported by Triton (cpu or documented gpu metrics)"
            )
            used |= names
            for metric, labels in promql_selectors(target["expr"]):
                for label, value in labels.items():
                    documented = GPU_ONLY_METRICS.get(metric, {}).get(label)
                    assert documented is None or value in documented, f"{metric}{{{label}={value!r}}} is not documented"
    required = {
        "nv_gpu_utilization",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_trt_llm_request_metrics",
        "mmtriton_engine_requests_in_flight",
        "nv_inference_request_success",
        "nv_inference_request_failure",
    }
    assert required <= used, f"dashboard lacks {sorted(required - used)}"


def test_grafana_provisioning_points_at_the_mounted_dashboards() -> None:
    provider = yaml.safe_load(GRAFANA_PROVIDERS.read_text())["providers"][0]
    volumes = _compose()["services"]["grafana"]["volumes"]
    assert f"./monitoring/grafana/dashboards:{provider['options']['path']}:ro" in volumes
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in volumes
    datasource = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"


def test_metric_name_helpers() -> None:
    expr = 'sum by (model) (rate(a_total{model="x"}[$__rate_interval])) / ignoring(t) b{t="used"} * 1e-6'
    assert promql_metric_names(expr) == {"a_total", "b"}
    assert promql_selectors(expr) == [("a_total", {"model": "x"}), ("b", {"t": "used"})]
    exposition = '# HELP nv_x help\n# TYPE nv_x counter\nnv_x{model="m",version="1"} 3\nup 1\n'
    assert prometheus_metric_names(exposition) == {"nv_x", "up"}
    with pytest.raises(AssertionError, match="unknown PromQL function 'rat'"):
        promql_metric_names("rat(x[1m])")
