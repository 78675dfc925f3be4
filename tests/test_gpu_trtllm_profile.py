"""The gpu-trtllm profile, checked without a GPU: build plan, engine world size, TP launcher, compose, monitoring.

TensorRT-LLM, trtexec and the DALI backend cannot run here, so these tests pin
what can be checked on a CPU: the exact commands of the TP=2 build plan, that
the world size is read from an engine's ``config.json``, the leader-mode
``mpirun`` command line, that a GPU-count mismatch stops the launcher before it
starts anything, that TP size / world size / GPU count agree across the build
plan, the launcher and ``docker-compose.yml``, and that the compose file, the
Prometheus config and the Grafana dashboard are valid (real validators where
installed: ``docker-compose`` and ``promtool`` from Debian's ``docker-compose``
and ``prometheus`` packages).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from build_engines import trtllm_build as gpu
from mmtriton.serving import engine_folder
from mmtriton.spec import ModelSpec, load_spec
from build_engines.stack import StackError, load_stack
from mmtriton.serving import tp_launcher
from tests.conftest import compose_ports

ROOT = Path(__file__).resolve().parent.parent
# The GPU smoke spec (head size 32, float16); tiny.toml (head size 16) is the CPU profile's.
TINY_SPEC = ROOT / "build_engines" / "specs" / "tiny-gpu.toml"
CPU_SPEC = ROOT / "build_engines" / "specs" / "tiny.toml"
SHIPPED_SPECS = sorted((ROOT / "build_engines" / "specs").glob("*.toml"))
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS = ROOT / "monitoring" / "prometheus.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "triton.json"
GRAFANA_DATASOURCES = ROOT / "monitoring" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
GRAFANA_PROVIDERS = ROOT / "monitoring" / "grafana" / "provisioning" / "dashboards" / "mmtriton.yml"
APT_HINT = "apt-get install -y --no-install-recommends docker-compose prometheus"

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


def prometheus_metric_names(exposition: str) -> set[str]:
    """Metric family names in Prometheus text exposition (e.g. a server's ``/metrics``).

    A conftest fixture ``cpu_server_metric_names`` can return this for the CPU
    server's ``/metrics``; the dashboard test then checks against it.
    """
    names = set(re.findall(r"^# TYPE ([A-Za-z_:][A-Za-z0-9_:]*) ", exposition, flags=re.MULTILINE))
    names |= set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", exposition, flags=re.MULTILINE))
    return names


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


def write_fake_engine(path: Path, *, tp: int, pp: int = 1, world: int | None = None, ranks: int | None = None) -> Path:
    """An engine folder shaped like trtllm-build output: config.json + rank<N>.engine."""
    path.mkdir(parents=True, exist_ok=True)
    mapping = {"world_size": tp * pp if world is None else world, "tp_size": tp, "pp_size": pp, "cp_size": 1, "rank": 0}
    config = {"version": "1.2.1", "pretrained_config": {"architecture": "LlamaForCausalLM", "mapping": mapping}}
    config["build_config"] = {"max_batch_size": 8}
    (path / "config.json").write_text(json.dumps(config))
    for rank in range(tp * pp if ranks is None else ranks):
        (path / f"rank{rank}.engine").write_bytes(b"")
    return path


def _onnx_model(path: Path, io: gpu.EncoderIO) -> None:
    import onnx
    from onnx import TensorProto, helper

    types = {"lengths": TensorProto.INT64, "out_lengths": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in io.inputs]
    outputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in io.outputs]
    nodes = [helper.make_node("Identity", [i], [o]) for i, o in zip(io.inputs, io.outputs, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(helper.make_graph(nodes, path.parent.name, inputs, outputs)), str(path))


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_validator() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> ModelSpec:
    return load_spec(TINY_SPEC)


@pytest.fixture
def fake_bundle(tmp_path: Path, tiny: ModelSpec) -> Path:
    """A bundle folder with the real layout and ONNX graphs with the real names (no weights)."""
    bundle = tmp_path / "bundles" / tiny.name
    (bundle / "llm").mkdir(parents=True)
    (bundle / "llm" / "config.json").write_text("{}")
    _onnx_model(bundle / "vision_encoder" / "model.onnx", gpu.VISION_IO)
    _onnx_model(bundle / "audio_encoder" / "model.onnx", gpu.AUDIO_IO)
    (bundle / "bundle.json").write_text(json.dumps({"spec": tiny.to_dict()}))
    return bundle


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


# --- stack -----------------------------------------------------------------------------------


def test_stack_pins_the_engine_flow_release() -> None:
    stack = load_stack()
    assert stack.tensorrt_llm.version == "1.2.1"
    assert stack.triton.image == f"nvcr.io/nvidia/tritonserver:{stack.triton.release}-trtllm-python-py3"
    assert stack.triton.dali_source_image == f"nvcr.io/nvidia/tritonserver:{stack.triton.release}-py3"
    assert stack.tensorrt_llm.examples_dir == "/app/examples"


def test_stack_rejects_unknown_keys(tmp_path: Path) -> None:
    broken = tmp_path / "stack.toml"
    text = (ROOT / "build_engines" / "stack.toml").read_text()
    broken.write_text(text.replace("[cuda]\n", '[cuda]\nbogus = "x"\n'))
    with pytest.raises(StackError, match=r"\[cuda\]: unknown key\(s\) \['bogus'\]"):
        load_stack(broken)


# --- build plan ----------------------------------------------------------------------------------


def test_dry_run_prints_the_full_tp2_plan(
    fake_bundle: Path, tmp_path: Path, tiny: ModelSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engines"
    code = gpu.main(
        ["--spec", str(TINY_SPEC), "--bundle", str(fake_bundle), "--out", str(out), "--trtexec", "trtexec", "--dry-run"]
    )
    text = capsys.readouterr().out
    assert code == 0
    assert not out.exists(), "a dry run must not write anything"

    rows = tiny.vision.tokens_per_image + tiny.audio.tokens(tiny.audio.max_frames)
    assert rows == 64 + 751
    ckpt = out / "tiny-gpu-ckpt-tp2-fp16"
    engine = out / "tiny-gpu-tp2-fp16-bs8-in1024-seq1280-ptable6520"
    vision = out / "tiny-gpu-vision-fp16-bs8-s64" / "model.plan"
    expected_commands = [
        (
            f"$ python3 /app/examples/models/core/llama/convert_checkpoint.py --model_dir {fake_bundle}/llm "
            f"--output_dir {ckpt} --dtype float16 --tp_size 2 --pp_size 1 --workers 2"
        ),
        (
            f"$ trtllm-build --checkpoint_dir {ckpt} --output_dir {engine} --gemm_plugin float16 "
            "--gpt_attention_plugin float16 --kv_cache_type paged --remove_input_padding enable --context_fmha enable "
            "--use_paged_context_fmha enable --max_batch_size 8 --max_beam_width 1 --max_input_len 1024 "
            f"--max_seq_len 1280 --max_num_tokens 8192 --max_prompt_embedding_table_size {8 * rows} --workers 2"
        ),
        (
            f"$ trtexec --onnx={fake_bundle}/vision_encoder/model.onnx --saveEngine={vision} --fp16 "
            "--minShapes=pixel_values:1x3x64x64 --optShapes=pixel_values:8x3x64x64 --maxShapes=pixel_values:8x3x64x64 "
            "--inputIOFormats=fp16:chw --outputIOFormats=fp16:chw --skipInference"
        ),
    ]
    commands = [line.strip() for line in text.splitlines() if line.strip().startswith("$ ")]
    assert commands == expected_commands

    written = [line.strip().removeprefix("writes ") for line in text.splitlines() if line.strip().startswith("writes ")]
    assert written == [
        str(ckpt / "config.json"),
        str(ckpt / "rank0.safetensors"),
        str(ckpt / "rank1.safetensors"),
        str(engine / "config.json"),
        str(engine / "rank0.engine"),
        str(engine / "rank1.engine"),
        str(vision),
        str(out / "gpu_build.json"),
    ]
    assert "tp_size=2 pp_size=1 world_size=2" in text
    assert text.rstrip().endswith("Dry run: 3 commands, 8 files; nothing was run or written.")


def test_dry_run_runs_as_a_module(fake_bundle: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "build_engines.trtllm_build", "--spec", str(TINY_SPEC), "--bundle", str(fake_bundle)]
        + ["--out", str(tmp_path / "engines"), "--dry-run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "[2/4] trtllm-build" in result.stdout and "--tp_size 2" in result.stdout


def test_plan_settings_follow_the_spec(fake_bundle: Path, tmp_path: Path, tiny: ModelSpec) -> None:
    plan = gpu.plan_gpu_build(tiny, fake_bundle, tmp_path / "engines")
    rows = tiny.vision.tokens_per_image + tiny.audio.tokens(tiny.audio.max_frames)
    assert plan.llm.world_size == plan.llm.tp_size == 2
    assert plan.llm.max_prompt_embedding_table_size == tiny.serving.max_batch_size * rows
    assert plan.llm.max_seq_len == tiny.llm.max_input_len + tiny.llm.max_output_len
    assert plan.engine_dir.name == "tiny-gpu-tp2-fp16-bs8-in1024-seq1280-ptable6520"
    manifest = plan.manifest_data()
    assert manifest["llm"]["world_size"] == 2 and manifest["llm"]["engine_dir"] == str(plan.engine_dir)
    assert [s["name"] for s in manifest["steps"]] == ["convert-checkpoint", "trtllm-build", "vision-plan"]


def test_glm_family_uses_its_convert_script(fake_bundle: Path, tmp_path: Path, tiny: ModelSpec) -> None:
    glm = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, family="glm", dtype="bfloat16"))
    plan = gpu.plan_gpu_build(glm, fake_bundle, tmp_path / "engines")
    convert = plan.steps[0].argv
    assert convert[1] == "/app/examples/models/core/glm-4-9b/convert_checkpoint.py"
    assert convert[-2:] == ("--chatglm_version", "glm4")
    # A bfloat16 checkpoint is converted to the FP16 engine the FP16 prompt tables need.
    assert convert[convert.index("--dtype") + 1] == "float16" and plan.llm.checkpoint_dtype == "bfloat16"
    assert "--gemm_plugin" in plan.steps[1].argv and plan.engine_dir.name.startswith("tiny-gpu-tp2-fp16-")


def test_plan_refuses_what_cannot_be_built(fake_bundle: Path, tmp_path: Path, tiny: ModelSpec) -> None:
    qwen = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, family="qwen"))
    with pytest.raises(
        gpu.GpuBuildError, match=r"llm.family 'qwen' has no GPU build recipe; known: \['glm', 'llama'\]"
    ):
        gpu.plan_gpu_build(qwen, fake_bundle, tmp_path)
    with pytest.raises(gpu.GpuBuildError, match="llm.num_attention_heads = 2 does not split over tp_size 3"):
        gpu.plan_gpu_build(tiny, fake_bundle, tmp_path, tp_size=3)
    _onnx_model(fake_bundle / "vision_encoder" / "model.onnx", gpu.EncoderIO(("pixels",), ("embeddings",)))
    with pytest.raises(gpu.GpuBuildError, match=r"graph inputs \['pixels'\]"):
        gpu.plan_gpu_build(tiny, fake_bundle, tmp_path)


def test_real_run_without_gpu_stops_before_doing_anything(
    fake_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    def _must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a step ran although the machine cannot build")

    monkeypatch.setattr(gpu, "_run_step", _must_not_run)
    out = tmp_path / "engines"
    code = gpu.main(["--spec", str(TINY_SPEC), "--bundle", str(fake_bundle), "--out", str(out)])
    assert code == 3
    assert "the GPU build cannot run on this machine; nothing was done" in caplog.text
    assert "nvidia-smi not found on PATH" in caplog.text
    assert "trtllm-build not found on PATH: TensorRT-LLM 1.2.1 is not installed" in caplog.text
    assert not out.exists()


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=[s.stem for s in SHIPPED_SPECS])
def test_every_shipped_spec_is_checked_before_the_dry_run(
    spec_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """GPU specs pass the head-size check and print their plan; the CPU spec (head 16) is refused, nothing printed."""
    spec = load_spec(spec_path)
    head = spec.llm.hidden_size // spec.llm.num_attention_heads
    out = tmp_path / "engines"
    code = gpu.main(["--spec", str(spec_path), "--bundle", str(tmp_path / "no-bundle"), "--out", str(out), "--dry-run"])
    text = capsys.readouterr().out
    assert not out.exists()
    if spec_path == CPU_SPEC:
        assert head == 16
        assert code == 2 and text == ""
        assert "TensorRT-LLM cannot build this model; nothing was done" in caplog.text
        assert "head size 16 (hidden_size 64 / 4 heads) is not supported" in caplog.text
        assert "supported head sizes: 32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256" in caplog.text
    else:
        # Independent of the facts module: the kernel list in decoderMaskedMultiheadAttention.cu.
        assert head in (32, 48, 64, 80, 96, 104, 112, 128, 144, 160, 192, 224, 256)
        assert code == 0, caplog.text
        assert "[2/4] trtllm-build" in text and "Dry run: 3 commands" in text


def test_head_size_16_is_refused_by_preflight_and_run(fake_bundle: Path, tmp_path: Path, tiny: ModelSpec) -> None:
    head16 = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, hidden_size=64, num_attention_heads=4))
    plan = gpu.plan_gpu_build(head16, fake_bundle, tmp_path / "engines")
    problems = gpu.build_problems(plan)
    assert len(problems) == 1 and "head size 16" in problems[0] and "224, 256" in problems[0]
    assert problems[0] in gpu.preflight(plan)
    with pytest.raises(gpu.GpuBuildError, match="head size 16"):
        gpu.run_plan(plan)
    assert not (tmp_path / "engines").exists()
    assert gpu.build_problems(gpu.plan_gpu_build(tiny, fake_bundle, tmp_path / "engines")) == []


def test_gpu_targets_default_to_a_spec_that_builds() -> None:
    """compose, the Dockerfile's CMD and the Makefile's gpu-* targets name one default spec, and it builds."""
    text = COMPOSE.read_text()
    spec_defaults = set(re.findall(r"\$\{SPEC:-([^}]+)\}", text))
    name_defaults = set(re.findall(r"\$\{SPEC_NAME:-([^}]+)\}", text))
    assert len(spec_defaults) == 1 and len(name_defaults) == 1
    spec_path = ROOT / spec_defaults.pop()
    spec = load_spec(spec_path)
    assert name_defaults == {spec.name}
    assert f"/workspace/build/repo-gpu-trtllm-{spec.name}" in DOCKERFILE.read_text().split("CMD", 1)[1]
    assert gpu.head_size_problem(spec.llm.hidden_size, spec.llm.num_attention_heads) is None
    dry = subprocess.run(["make", "-n", "gpu-plan", "gpu-engines"], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k not in ("SPEC", "SPEC_NAME")}, check=True)
    assert f"--spec {spec_path.relative_to(ROOT)}" in dry.stdout and f"SPEC_NAME={spec.name} " in dry.stdout
    given = subprocess.run(["make", "-n", "gpu-plan", "SPEC=build_engines/specs/glm4-9b-shape.toml"], cwd=ROOT,
                           capture_output=True, text=True, check=True)
    assert "--out build/engines/glm4-9b-shape --dry-run" in given.stdout


# --- engine world size ---------------------------------------------------------------------------


def test_world_size_is_read_from_the_engine_config(tmp_path: Path) -> None:
    assert gpu.engine_world_size(write_fake_engine(tmp_path / "tp2", tp=2)) == 2
    mapping = engine_folder.read_engine_mapping(write_fake_engine(tmp_path / "tp2pp2", tp=2, pp=2))
    assert (mapping.world_size, mapping.tp_size, mapping.pp_size) == (4, 2, 2)


def test_engine_config_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(engine_folder.EngineConfigError, match="config.json not found"):
        gpu.engine_world_size(tmp_path / "nothing")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(engine_folder.EngineConfigError, match="no pretrained_config.mapping"):
        gpu.engine_world_size(hf)
    with pytest.raises(engine_folder.EngineConfigError, match=r"world_size 4 != tp_size 2 x pp_size 1 x cp_size 1"):
        gpu.engine_world_size(write_fake_engine(tmp_path / "odd", tp=2, world=4))
    with pytest.raises(engine_folder.EngineConfigError, match=r"world size 2 but \['rank1.engine'\] missing"):
        gpu.engine_world_size(write_fake_engine(tmp_path / "half", tp=2, ranks=1))


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
    validator = _compose_validator()
    if validator is None:
        pytest.fail(f"no compose validator (docker-compose or the docker compose plugin); install: {APT_HINT}")
    env = {k: v for k, v in os.environ.items() if k not in ("SPEC", "SPEC_NAME", "GRAFANA_ADMIN_PASSWORD")}
    args = [*validator, "-f", str(COMPOSE), "--project-directory", str(ROOT), "--profile", "build"]
    args += ["--profile", "monitoring", "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_compose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    validator = _compose_validator()
    if validator is None:
        pytest.fail(f"no compose validator (docker-compose or the docker compose plugin); install: {APT_HINT}")
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("shm_size:", "shm_sise:", 1))
    args = [*validator, "-f", str(broken), "--project-directory", str(ROOT), "config", "-q"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "shm_sise" in result.stderr


def test_tp_size_world_size_and_gpu_count_agree(fake_bundle: Path, tmp_path: Path, tiny: ModelSpec) -> None:
    plan = gpu.plan_gpu_build(tiny, fake_bundle, tmp_path / "engines")
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
