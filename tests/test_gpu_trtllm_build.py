"""The gpu-trtllm build, checked without a GPU: the pinned stack, the build plan, the engine's world size.

TensorRT-LLM and trtexec cannot run here, so these tests pin what can be checked on
a CPU: the exact commands and files of the TP=2 build plan, its settings against the
spec, what refuses a build before anything runs (head size, a machine without a GPU),
and that the world size is read from an engine's ``config.json``. The TP launcher,
compose and monitoring files are checked in ``tests/test_gpu_trtllm_profile.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from build_engines import trtllm_build
from build_engines.encoder_io import EncoderIO
from build_engines.stack import StackError, load_stack
from build_engines.trtllm_checks import build_problems, engine_world_size, preflight
from build_engines.trtllm_facts import head_size_problem
from build_engines.trtllm_plan import plan_gpu_build
from build_engines.trtllm_settings import GpuBuildError
from mmtriton.serving import engine_folder
from mmtriton.spec import ModelSpec, load_spec
from tests.helpers.deploy import (
    COMPOSE,
    DOCKERFILE,
    TINY_SPEC,
    write_fake_bundle,
    write_fake_engine,
    write_identity_onnx,
)

ROOT = Path(__file__).resolve().parent.parent
CPU_SPEC = ROOT / "build_engines" / "specs" / "tiny.toml"
SHIPPED_SPECS = sorted((ROOT / "build_engines" / "specs").glob("*.toml"))


# --- helpers -----------------------------------------------------------------------------


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny() -> ModelSpec:
    return load_spec(TINY_SPEC)


@pytest.fixture
def fake_bundle(tmp_path: Path, tiny: ModelSpec) -> Path:
    """A bundle folder with the real layout and ONNX graphs with the real names (no weights)."""
    return write_fake_bundle(tmp_path, tiny)


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
    code = trtllm_build.main(
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
    plan = plan_gpu_build(tiny, fake_bundle, tmp_path / "engines")
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
    plan = plan_gpu_build(glm, fake_bundle, tmp_path / "engines")
    convert = plan.steps[0].argv
    assert convert[1] == "/app/examples/models/core/glm-4-9b/convert_checkpoint.py"
    assert convert[-2:] == ("--chatglm_version", "glm4")
    # A bfloat16 checkpoint is converted to the FP16 engine the FP16 prompt tables need.
    assert convert[convert.index("--dtype") + 1] == "float16" and plan.llm.checkpoint_dtype == "bfloat16"
    assert "--gemm_plugin" in plan.steps[1].argv and plan.engine_dir.name.startswith("tiny-gpu-tp2-fp16-")


def test_plan_refuses_what_cannot_be_built(fake_bundle: Path, tmp_path: Path, tiny: ModelSpec) -> None:
    qwen = dataclasses.replace(tiny, llm=dataclasses.replace(tiny.llm, family="qwen"))
    with pytest.raises(
        GpuBuildError, match=r"llm.family 'qwen' has no GPU build recipe; known: \['glm', 'llama'\]"
    ):
        plan_gpu_build(qwen, fake_bundle, tmp_path)
    with pytest.raises(GpuBuildError, match="llm.num_attention_heads = 2 does not split over tp_size 3"):
        plan_gpu_build(tiny, fake_bundle, tmp_path, tp_size=3)
    write_identity_onnx(fake_bundle / "vision_encoder" / "model.onnx", EncoderIO(("pixels",), ("embeddings",)))
    with pytest.raises(GpuBuildError, match=r"graph inputs \['pixels'\]"):
        plan_gpu_build(tiny, fake_bundle, tmp_path)


def test_real_run_without_gpu_stops_before_doing_anything(
    fake_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    def _must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("a step ran although the machine cannot build")

    monkeypatch.setattr(trtllm_build, "_run_step", _must_not_run)
    out = tmp_path / "engines"
    code = trtllm_build.main(["--spec", str(TINY_SPEC), "--bundle", str(fake_bundle), "--out", str(out)])
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
    code = trtllm_build.main(["--spec", str(spec_path), "--bundle", str(tmp_path / "no-bundle"), "--out", str(out), "--dry-run"])
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
    plan = plan_gpu_build(head16, fake_bundle, tmp_path / "engines")
    problems = build_problems(plan)
    assert len(problems) == 1 and "head size 16" in problems[0] and "224, 256" in problems[0]
    assert problems[0] in preflight(plan)
    with pytest.raises(GpuBuildError, match="head size 16"):
        trtllm_build.run_plan(plan)
    assert not (tmp_path / "engines").exists()
    assert build_problems(plan_gpu_build(tiny, fake_bundle, tmp_path / "engines")) == []


def test_a_new_run_drops_the_previous_manifest(
    fake_bundle: Path, tmp_path: Path, tiny: ModelSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gpu_build.json stands for a finished build (the renderer plans from it): a run that fails leaves none."""
    plan = plan_gpu_build(tiny, fake_bundle, tmp_path / "engines", tp_size=1)
    plan.out.mkdir(parents=True)
    plan.manifest.write_text(json.dumps(plan.manifest_data()))

    def _fails(step: object, log_path: Path) -> None:
        raise GpuBuildError("step convert-checkpoint failed with exit code 1")

    monkeypatch.setattr(trtllm_build, "_run_step", _fails)
    with pytest.raises(GpuBuildError, match="exit code 1"):
        trtllm_build.run_plan(plan)
    assert not plan.manifest.exists()


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
    assert head_size_problem(spec.llm.hidden_size, spec.llm.num_attention_heads) is None
    dry = subprocess.run(["make", "-n", "gpu-plan", "gpu-engines"], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k not in ("SPEC", "SPEC_NAME")}, check=True)
    assert f"--spec {spec_path.relative_to(ROOT)}" in dry.stdout and f"SPEC_NAME={spec.name} " in dry.stdout
    given = subprocess.run(["make", "-n", "gpu-plan", "SPEC=build_engines/specs/glm4-9b-shape.toml"], cwd=ROOT,
                           capture_output=True, text=True, check=True)
    assert "--out build/engines/glm4-9b-shape --dry-run" in given.stdout


# --- engine world size ---------------------------------------------------------------------------


def test_world_size_is_read_from_the_engine_config(tmp_path: Path) -> None:
    assert engine_world_size(write_fake_engine(tmp_path / "tp2", tp=2)) == 2
    mapping = engine_folder.read_engine_mapping(write_fake_engine(tmp_path / "tp2pp2", tp=2, pp=2))
    assert (mapping.world_size, mapping.tp_size, mapping.pp_size) == (4, 2, 2)


def test_engine_config_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(engine_folder.EngineConfigError, match="config.json not found"):
        engine_world_size(tmp_path / "nothing")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(engine_folder.EngineConfigError, match="no pretrained_config.mapping"):
        engine_world_size(hf)
    with pytest.raises(engine_folder.EngineConfigError, match=r"world_size 4 != tp_size 2 x pp_size 1 x cp_size 1"):
        engine_world_size(write_fake_engine(tmp_path / "odd", tp=2, world=4))
    with pytest.raises(engine_folder.EngineConfigError, match=r"world size 2 but \['rank1.engine'\] missing"):
        engine_world_size(write_fake_engine(tmp_path / "half", tp=2, ranks=1))
