"""GPU build plan: TensorRT-LLM engines (TP=2) and the TensorRT vision-encoder plan for one model spec.

The plan has three commands, run inside the pinned TensorRT-LLM image
(``build_engines/stack.toml``):

1. ``convert_checkpoint.py`` of the spec's LLM family: Hugging Face checkpoint
   (``<bundle>/llm``) -> TensorRT-LLM checkpoint split for ``tp_size`` ranks.
2. ``trtllm-build``: one engine per rank with in-flight batching settings (paged
   KV cache, packed input, context FMHA on the paged cache) and room for the
   prompt table of every running request's image and longest audio clip.
3. ``trtexec``: FP16 TensorRT plan of the vision encoder ONNX.

There is no audio-encoder plan: the gpu-trtllm profile serves the audio encoder on the
python backend (PyTorch on the GPU), see the end of :func:`plan_gpu_build`.

Before anything runs (also before a dry run prints), :func:`build_problems` refuses
a model TensorRT-LLM cannot build, e.g. a head size the GPT attention plugin has no
kernel for (:mod:`build_engines.trtllm_facts`).

Folders are named by their settings, e.g. ``tiny-gpu-tp2-fp16-bs8-in1024-seq1280-ptable6520``;
``gpu_build.json`` in the output folder records the settings, the commands and
where each artifact is, for the gpu-profile renderer and the TP launcher.

    python -m build_engines.trtllm_build --spec build_engines/specs/tiny-gpu.toml \\
        --bundle build/bundles/tiny-gpu --out build/engines/tiny-gpu --dry-run

``--dry-run`` prints every command and file in order and runs nothing. A real
run first checks for a GPU (``nvidia-smi``), ``trtllm-build``, ``trtexec``, the
convert script and the bundle, and stops before doing anything if one is missing.

Upstream facts used here, read from stored copies of the sources:

- ``convert_checkpoint.py`` flags ``--model_dir --output_dir --dtype {auto,float16,
  bfloat16,float32} --tp_size --pp_size --workers``: NVIDIA/TensorRT-LLM
  ``examples/models/core/llama/convert_checkpoint.py`` (index commit 368f8f2a) and
  ``examples/models/core/glm-4-9b/convert_checkpoint.py`` (``--chatglm_version``,
  choices from ``tensorrt_llm/models/chatglm/config.py`` ``GLM_VERSIONS`` incl. ``glm4``).
  Both write ``config.json`` and ``rank<N>.safetensors``.
- ``trtllm-build`` flags ``--checkpoint_dir --output_dir --max_batch_size
  --max_input_len --max_seq_len --max_num_tokens --max_beam_width
  --max_prompt_embedding_table_size --kv_cache_type {continuous,paged,disabled}
  --workers``: ``tensorrt_llm/commands/build.py`` (index commits 008b2b8d, 65f1d153).
  Plugin/feature flags come from ``PluginConfig`` fields exposed by
  ``add_plugin_argument`` (``tensorrt_llm/plugin/plugin.py``): ``--gemm_plugin`` and
  ``--gpt_attention_plugin`` take a dtype, ``auto`` or ``disable``;
  ``--remove_input_padding``, ``--context_fmha``, ``--use_paged_context_fmha`` take
  ``enable``/``disable``. ``--workers`` is capped at the visible GPU count.
- Examples live at ``/app/examples`` in the Triton TensorRT-LLM image:
  triton-inference-server/tensorrtllm_backend ``dockerfile/Dockerfile.triton.trt_llm_backend``
  (branch r26.07).
- Engine folder: ``config.json`` = ``{version, pretrained_config, build_config}``
  (``tensorrt_llm/builder.py`` ``EngineConfig.to_dict``), ``pretrained_config.mapping``
  holds ``world_size, tp_size, pp_size, cp_size`` (``tensorrt_llm/mapping.py``
  ``to_dict``); the C++ runtime reads ``pretrained_config.mapping.tp_size`` and
  ``pp_size`` and loads ``rank<N>.engine`` (``cpp/tensorrt_llm/runtime/gptJsonConfig.cpp``).
- ``trtexec`` flags ``--onnx= --saveEngine= --fp16 --minShapes= --optShapes=
  --maxShapes= --inputIOFormats= --outputIOFormats= --skipInference``, shape spec
  ``name:AxBxC,name2:D``, IO types incl. ``fp16``/``fp32``/``int64`` with format ``chw``:
  NVIDIA/TensorRT ``samples/common/sampleOptions.cpp`` (help text). Newer TensorRT
  marks ``--fp16`` deprecated in favour of strong typing; 10.14 still accepts it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtriton.spec import ModelSpec, SpecError, load_spec, prompt_table_rows_per_request
from build_engines.stack import STACK_FILE, Stack, StackError, load_stack
from build_engines.steps import BuildStep, StepError, StepResult, format_table, is_up_to_date, run_step, stamp_path
from build_engines.trtllm_facts import head_size_problem
from mmtriton.serving.engine_folder import EngineConfigError, read_engine_mapping

LOGGER = logging.getLogger(__name__)

#: ``convert_checkpoint.py --dtype`` choices this plan passes (``auto`` is never used).
CONVERT_DTYPES = ("float16", "bfloat16", "float32")
DTYPE_TAGS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
#: Dtype of every engine this plan builds: that of the prompt table the encoders send
#: (``prompt_embedding_table`` TYPE_FP16 in model_repository/tensorrt_llm/config.pbtxt). The
#: batch manager refuses a request table whose dtype differs from the engine's
#: (build_engines/trtllm_facts.py ``ENGINE_DTYPE_TO_TRITON``); upstream's multimodal examples
#: convert with ``--dtype float16`` too. The spec's ``llm.dtype`` is the checkpoint's dtype.
ENGINE_DTYPE = "float16"
#: Upper bound for ``--max_num_tokens``: TensorRT-LLM's own default chunk size
#: (tensorrtllm_backend docs/multimodal.md, 1.2.1-era).
DEFAULT_MAX_NUM_TOKENS = 8192
MANIFEST_NAME = "gpu_build.json"


class GpuBuildError(RuntimeError):
    """The plan cannot be made, the machine cannot run it, or a step failed."""


@dataclass(frozen=True)
class LLMFamily:
    """How TensorRT-LLM 1.2.1 converts one model family's Hugging Face checkpoint.

    Attributes:
        name: ``llm.family`` in the model spec.
        convert_script: ``convert_checkpoint.py`` path relative to the examples folder.
        convert_args: Family-specific flags added to the common ones.
    """

    name: str
    convert_script: str
    convert_args: tuple[str, ...] = ()


FAMILIES: dict[str, LLMFamily] = {
    "llama": LLMFamily("llama", "models/core/llama/convert_checkpoint.py"),
    # ChatGLMForCausalLM; the script infers the version when omitted, naming it is explicit.
    "glm": LLMFamily("glm", "models/core/glm-4-9b/convert_checkpoint.py", ("--chatglm_version", "glm4")),
}


@dataclass(frozen=True)
class EncoderIO:
    """Graph input and output names of an exported encoder, in graph order."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


#: The bundle's ONNX layout (build_engines/bundle.py docstring).
VISION_IO = EncoderIO(("pixel_values",), ("embeddings",))
AUDIO_IO = EncoderIO(("features", "lengths"), ("embeddings", "out_lengths"))


@dataclass(frozen=True)
class LLMBuildSettings:
    """Every setting of the TensorRT-LLM checkpoint conversion and engine build."""

    family: LLMFamily
    tp_size: int
    pp_size: int
    dtype: str
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_num_tokens: int
    max_prompt_embedding_table_size: int
    checkpoint_dtype: str = ENGINE_DTYPE

    @property
    def world_size(self) -> int:
        """GPUs (MPI ranks) the engine needs: ``tp_size x pp_size``."""
        return self.tp_size * self.pp_size

    @property
    def parallel_tag(self) -> str:
        """``tp2`` or ``tp2-pp2``, for folder names."""
        return f"tp{self.tp_size}" + (f"-pp{self.pp_size}" if self.pp_size > 1 else "")

    def engine_name(self, spec_name: str) -> str:
        """Engine folder name, e.g. ``tiny-gpu-tp2-fp16-bs8-in1024-seq1280-ptable6520``."""
        return (
            f"{spec_name}-{self.parallel_tag}-{DTYPE_TAGS[self.dtype]}-bs{self.max_batch_size}"
            f"-in{self.max_input_len}-seq{self.max_seq_len}-ptable{self.max_prompt_embedding_table_size}"
        )

    def checkpoint_name(self, spec_name: str) -> str:
        """TensorRT-LLM checkpoint folder name, e.g. ``tiny-gpu-ckpt-tp2-fp16``."""
        return f"{spec_name}-ckpt-{self.parallel_tag}-{DTYPE_TAGS[self.dtype]}"


@dataclass(frozen=True)
class GpuBuildPlan:
    """The whole GPU build for one spec, in order, before anything runs."""

    spec: ModelSpec
    stack: Stack
    bundle: Path
    out: Path
    llm: LLMBuildSettings
    checkpoint_dir: Path
    engine_dir: Path
    vision_plan: Path
    steps: tuple[BuildStep, ...]
    tools: dict[str, str] = field(default_factory=dict)

    @property
    def manifest(self) -> Path:
        """``gpu_build.json``: written last, after every step succeeded."""
        return self.out / MANIFEST_NAME

    def files(self) -> list[Path]:
        """Every file the build writes, in order (logs and stamps left out)."""
        return [path for step in self.steps for path in step.outputs] + [self.manifest]

    def manifest_data(self) -> dict[str, Any]:
        """What ``gpu_build.json`` records: settings, artifacts, commands and the stack."""
        llm = self.llm
        return {
            "format": 1,
            "spec": self.spec.name,
            "bundle": str(self.bundle),
            "stack": {
                "triton_image": self.stack.triton.image,
                "dali_source_image": self.stack.triton.dali_source_image,
                "tensorrt_llm": self.stack.tensorrt_llm.version,
                "tensorrt": self.stack.tensorrt.version,
            },
            "llm": {
                "family": llm.family.name,
                "tp_size": llm.tp_size,
                "pp_size": llm.pp_size,
                "world_size": llm.world_size,
                "dtype": llm.dtype,
                "checkpoint_dtype": llm.checkpoint_dtype,
                "max_batch_size": llm.max_batch_size,
                "max_input_len": llm.max_input_len,
                "max_seq_len": llm.max_seq_len,
                "max_num_tokens": llm.max_num_tokens,
                "max_prompt_embedding_table_size": llm.max_prompt_embedding_table_size,
                "checkpoint_dir": str(self.checkpoint_dir),
                "engine_dir": str(self.engine_dir),
            },
            "encoders": {"vision_encoder": str(self.vision_plan)},
            "steps": [{"name": s.name, "argv": list(s.argv)} for s in self.steps],
        }


def llm_settings(
    spec: ModelSpec, *, tp_size: int = 2, pp_size: int = 1, max_num_tokens: int | None = None
) -> LLMBuildSettings:
    """Derive the engine settings from the spec.

    ``max_prompt_embedding_table_size`` is ``max_batch_size`` times the rows of
    one image and the longest audio clip, so every running request can carry a
    full table (the preprocessing model gives each request ``table // max_batch_size``
    rows, tensorrtllm_backend ``preprocessing/1/model.py``). ``max_num_tokens``
    (tokens per engine step) is ``max_batch_size x max_input_len`` capped at
    TensorRT-LLM's default of 8192, and never below ``max_input_len`` when
    chunked context is off (a whole prompt must then fit one step). The engine
    dtype is always :data:`ENGINE_DTYPE` (the prompt table's); ``llm.dtype`` is the
    checkpoint's, which ``convert_checkpoint.py --dtype`` casts from.

    Raises:
        GpuBuildError: Unknown family or dtype, a non-positive parallel size, or
            lengths the model cannot hold.
    """
    family = FAMILIES.get(spec.llm.family)
    if family is None:
        raise GpuBuildError(f"llm.family {spec.llm.family!r} has no GPU build recipe; known: {sorted(FAMILIES)}")
    if spec.llm.dtype not in CONVERT_DTYPES:
        raise GpuBuildError(f"llm.dtype {spec.llm.dtype!r} is not one of {list(CONVERT_DTYPES)}")
    if tp_size < 1 or pp_size < 1:
        raise GpuBuildError(f"tp_size and pp_size must be at least 1, got {tp_size} and {pp_size}")
    llm = spec.llm
    if llm.num_attention_heads % tp_size:
        raise GpuBuildError(
            f"llm.num_attention_heads = {llm.num_attention_heads} does not split over tp_size {tp_size}"
        )
    # Fewer KV heads than ranks is allowed when each KV head is replicated a whole number of times.
    kv = llm.num_key_value_heads
    if kv % tp_size and tp_size % kv:
        raise GpuBuildError(f"llm.num_key_value_heads = {kv} neither splits over nor divides tp_size {tp_size}")
    max_seq_len = llm.max_input_len + llm.max_output_len
    if max_seq_len > llm.max_position_embeddings:
        raise GpuBuildError(
            f"max_input_len + max_output_len = {max_seq_len} exceeds llm.max_position_embeddings "
            f"{llm.max_position_embeddings}"
        )
    batch = spec.serving.max_batch_size
    if max_num_tokens is None:
        max_num_tokens = min(DEFAULT_MAX_NUM_TOKENS, batch * llm.max_input_len)
        if not spec.serving.enable_chunked_context:
            max_num_tokens = max(max_num_tokens, llm.max_input_len)
    if not spec.serving.enable_chunked_context and max_num_tokens < llm.max_input_len:
        raise GpuBuildError(
            f"max_num_tokens {max_num_tokens} < max_input_len {llm.max_input_len} needs "
            "serving.enable_chunked_context = true"
        )
    return LLMBuildSettings(
        family=family,
        tp_size=tp_size,
        pp_size=pp_size,
        dtype=ENGINE_DTYPE,
        checkpoint_dtype=llm.dtype,
        max_batch_size=batch,
        max_input_len=llm.max_input_len,
        max_seq_len=max_seq_len,
        max_num_tokens=max_num_tokens,
        max_prompt_embedding_table_size=batch * prompt_table_rows_per_request(spec),
    )


def read_onnx_io(path: Path) -> EncoderIO | None:
    """Graph input/output names of an ONNX file, or None when it cannot be read here.

    Initializers listed as graph inputs (old exporters) are left out.
    """
    try:
        import onnx  # present in the image (TensorRT-LLM requirement) and in the CPU venv
    except ImportError:
        return None
    if not path.is_file():
        return None
    model = onnx.load(str(path), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    inputs = tuple(i.name for i in model.graph.input if i.name not in weights)
    return EncoderIO(inputs, tuple(o.name for o in model.graph.output))


def _check_io(path: Path, expected: EncoderIO) -> bool:
    """True when the file was read and matches; False when it could not be read."""
    found = read_onnx_io(path)
    if found is None:
        return False
    if found != expected:
        raise GpuBuildError(
            f"{path}: graph inputs {list(found.inputs)} / outputs {list(found.outputs)}; "
            f"the bundle layout needs {list(expected.inputs)} / {list(expected.outputs)}"
        )
    return True


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    """trtexec shape spec: ``name:AxBxC,name2:D``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def _trtexec_argv(
    trtexec: str,
    onnx_path: Path,
    plan: Path,
    profile: tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]],
    input_formats: Sequence[str],
    output_formats: Sequence[str],
) -> tuple[str, ...]:
    low, opt, high = profile
    return (
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan}",
        "--fp16",
        f"--minShapes={_shapes(low)}",
        f"--optShapes={_shapes(opt)}",
        f"--maxShapes={_shapes(high)}",
        # One entry per graph input/output, in graph order (sampleOptions.cpp help).
        f"--inputIOFormats={','.join(input_formats)}",
        f"--outputIOFormats={','.join(output_formats)}",
        "--skipInference",
    )


def resolve_trtexec(configured: str) -> str | None:
    """The configured ``trtexec`` if it exists, else the one on PATH, else None."""
    if os.path.isfile(configured) and os.access(configured, os.X_OK):
        return configured
    return shutil.which(configured) or shutil.which("trtexec")


def plan_gpu_build(
    spec: ModelSpec,
    bundle: Path,
    out: Path,
    *,
    stack: Stack | None = None,
    tp_size: int = 2,
    pp_size: int = 1,
    max_num_tokens: int | None = None,
    python: str | None = None,
    examples_dir: str | None = None,
    trtexec: str | None = None,
) -> GpuBuildPlan:
    """Make the GPU build plan for a spec; nothing is run or written.

    Args:
        spec: The model spec.
        bundle: Bundle folder (``python -m build_engines bundle``); ``llm/`` is the HF checkpoint.
        out: Output folder for checkpoints, engines, plans and ``gpu_build.json``.
        stack: Pinned stack; ``build_engines/stack.toml`` by default.
        tp_size: Tensor-parallel size (the production profile uses 2).
        pp_size: Pipeline-parallel size.
        max_num_tokens: Override of :func:`llm_settings`'s choice.
        python: Interpreter for ``convert_checkpoint.py`` (stack default ``python3``).
        examples_dir: TensorRT-LLM examples folder (stack default ``/app/examples``).
        trtexec: ``trtexec`` binary (stack default, else PATH).

    Returns:
        The plan.

    Raises:
        GpuBuildError: The spec cannot be built (see :func:`llm_settings`), or an
            existing bundle ONNX does not have the expected graph names.
    """
    stack = stack or load_stack()
    llm = llm_settings(spec, tp_size=tp_size, pp_size=pp_size, max_num_tokens=max_num_tokens)
    python = python or stack.tensorrt_llm.python
    examples = examples_dir or stack.tensorrt_llm.examples_dir
    trtexec_bin = trtexec or resolve_trtexec(stack.tensorrt.trtexec) or stack.tensorrt.trtexec
    # Absolute paths: gpu_build.json and the rendered configs must not depend on the cwd.
    bundle, out = Path(bundle).absolute(), Path(out).absolute()
    name = spec.name

    checkpoint_dir = out / llm.checkpoint_name(name)
    engine_dir = out / llm.engine_name(name)
    ranks = range(llm.world_size)
    convert = BuildStep(
        name="convert-checkpoint",
        title=f"Hugging Face checkpoint -> TensorRT-LLM checkpoint ({llm.family.name}, {llm.parallel_tag}, {llm.dtype})",
        argv=(
            python,
            f"{examples.rstrip('/')}/{llm.family.convert_script}",
            "--model_dir",
            str(bundle / "llm"),
            "--output_dir",
            str(checkpoint_dir),
            "--dtype",
            llm.dtype,
            "--tp_size",
            str(llm.tp_size),
            "--pp_size",
            str(llm.pp_size),
            "--workers",
            str(llm.world_size),
            *llm.family.convert_args,
        ),
        output_dir=checkpoint_dir,
        outputs=(checkpoint_dir / "config.json", *(checkpoint_dir / f"rank{r}.safetensors" for r in ranks)),
    )
    build = BuildStep(
        name="trtllm-build",
        title=f"TensorRT-LLM engines, one per rank ({llm.world_size} ranks, in-flight batching)",
        argv=(
            stack.tensorrt_llm.trtllm_build,
            "--checkpoint_dir",
            str(checkpoint_dir),
            "--output_dir",
            str(engine_dir),
            "--gemm_plugin",
            llm.dtype,
            "--gpt_attention_plugin",
            llm.dtype,
            "--kv_cache_type",
            "paged",
            "--remove_input_padding",
            "enable",
            "--context_fmha",
            "enable",
            # Needed by chunked context and KV-cache reuse.
            "--use_paged_context_fmha",
            "enable",
            "--max_batch_size",
            str(llm.max_batch_size),
            "--max_beam_width",
            "1",
            "--max_input_len",
            str(llm.max_input_len),
            "--max_seq_len",
            str(llm.max_seq_len),
            "--max_num_tokens",
            str(llm.max_num_tokens),
            "--max_prompt_embedding_table_size",
            str(llm.max_prompt_embedding_table_size),
            "--workers",
            str(llm.world_size),
        ),
        output_dir=engine_dir,
        outputs=(engine_dir / "config.json", *(engine_dir / f"rank{r}.engine" for r in ranks)),
    )

    batch = spec.serving.max_batch_size
    size = spec.vision.image_size
    vision_onnx = bundle / "vision_encoder" / "model.onnx"
    _check_io(vision_onnx, VISION_IO)
    vision_dir = out / f"{name}-vision-fp16-bs{batch}-s{size}"
    vision_plan = vision_dir / "model.plan"

    def pixels(b: int) -> dict[str, tuple[int, ...]]:
        return {"pixel_values": (b, 3, size, size)}

    vision = BuildStep(
        name="vision-plan",
        title=f"TensorRT plan of the vision encoder (FP16, batch 1..{batch})",
        # pixel_values arrives as FP16 from image_preprocess and embeddings leave as FP16.
        argv=_trtexec_argv(
            trtexec_bin, vision_onnx, vision_plan, (pixels(1), pixels(batch), pixels(batch)), ["fp16:chw"], ["fp16:chw"]
        ),
        output_dir=vision_dir,
        outputs=(vision_plan,),
    )

    # No audio plan: the audio encoder serves on the python backend (PyTorch on the GPU) in the gpu
    # profile. Its padded, masked batch of clips of different lengths does not fit the TensorRT
    # backend, which hands ragged inputs to a plan as one flat concatenation.
    return GpuBuildPlan(
        spec=spec,
        stack=stack,
        bundle=bundle,
        out=out,
        llm=llm,
        checkpoint_dir=checkpoint_dir,
        engine_dir=engine_dir,
        vision_plan=vision_plan,
        steps=(convert, build, vision),
        tools={"python": python, "examples_dir": examples, "trtexec": trtexec_bin},
    )


def engine_world_size(engine_dir: str | Path, *, check_rank_files: bool = True) -> int:
    """GPUs a TensorRT-LLM engine needs (``pretrained_config.mapping.world_size``).

    See :func:`read_engine_mapping` for what is checked.
    """
    return read_engine_mapping(engine_dir, check_rank_files=check_rank_files).world_size


def preflight(plan: GpuBuildPlan) -> list[str]:
    """Everything missing on this machine for a real run; empty when it can run."""
    problems = build_problems(plan)
    image = plan.stack.triton.image
    smi = shutil.which("nvidia-smi")
    if smi is None:
        problems.append("nvidia-smi not found on PATH: no NVIDIA driver, so no GPU to build on")
    else:
        try:
            listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60, check=False)
            gpus = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
            if listing.returncode != 0 or not gpus:
                problems.append(f"nvidia-smi -L lists no GPU (exit {listing.returncode}): {listing.stderr.strip()}")
        except (OSError, subprocess.TimeoutExpired) as err:
            problems.append(f"nvidia-smi -L failed: {err}")
    if shutil.which(plan.stack.tensorrt_llm.trtllm_build) is None:
        problems.append(
            f"{plan.stack.tensorrt_llm.trtllm_build} not found on PATH: TensorRT-LLM "
            f"{plan.stack.tensorrt_llm.version} is not installed (run inside {image})"
        )
    trtexec = plan.tools.get("trtexec", "")
    if not (os.path.isfile(trtexec) and os.access(trtexec, os.X_OK)) and shutil.which(trtexec) is None:
        problems.append(f"trtexec not found ({trtexec}, nor on PATH): pass --trtexec")
    script = Path(plan.steps[0].argv[1])
    if not script.is_file():
        problems.append(
            f"{script} not found: pass --examples-dir (TensorRT-LLM {plan.stack.tensorrt_llm.version} examples)"
        )
    needed = [plan.bundle / "bundle.json", plan.bundle / "llm" / "config.json"]
    needed += [plan.bundle / m / "model.onnx" for m in ("vision_encoder", "audio_encoder")]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        problems.append(f"bundle incomplete, missing {missing}: run python -m build_engines bundle first")
    return problems


def build_problems(plan: GpuBuildPlan) -> list[str]:
    """Why ``trtllm-build`` or the engine would fail on this plan's model, found before anything runs.

    Checked: the head size against the GPT attention plugin's kernels
    (:data:`build_engines.trtllm_facts.MMHA_HEAD_SIZES`).

    Returns:
        One line per problem; empty when the model can be built.
    """
    llm = plan.spec.llm
    problem = head_size_problem(llm.hidden_size, llm.num_attention_heads)
    return [f"{plan.spec.source or plan.spec.name}: {problem}"] if problem else []


def check_bundle_spec(plan: GpuBuildPlan) -> None:
    """Refuse a bundle built from a different spec than the one given.

    Raises:
        GpuBuildError: ``bundle.json`` records another spec.
    """
    bundle_json = plan.bundle / "bundle.json"
    if not bundle_json.is_file():
        return
    recorded = json.loads(bundle_json.read_text()).get("spec")
    if recorded != json.loads(json.dumps(plan.spec.to_dict())):
        raise GpuBuildError(
            f"{bundle_json} was built from a different spec than {plan.spec.source}; rebuild the bundle"
        )


def describe_plan(plan: GpuBuildPlan) -> str:
    """The dry-run text: settings, then each command and the files it writes, then a summary."""
    llm = plan.llm
    stack = plan.stack
    lines = [
        (
            f"GPU build plan for {plan.spec.name} (TensorRT-LLM {stack.tensorrt_llm.version}, TensorRT "
            f"{stack.tensorrt.version}, image {stack.triton.image})"
        ),
        (
            f"  llm: family={llm.family.name} dtype={llm.dtype} (checkpoint {llm.checkpoint_dtype}; prompt tables are "
            f"FP16) tp_size={llm.tp_size} pp_size={llm.pp_size} "
            f"world_size={llm.world_size}"
        ),
        (
            f"  max_batch_size={llm.max_batch_size} max_input_len={llm.max_input_len} max_seq_len={llm.max_seq_len} "
            f"max_num_tokens={llm.max_num_tokens} max_prompt_embedding_table_size={llm.max_prompt_embedding_table_size} "
            f"(= {llm.max_batch_size} x ({plan.spec.vision.tokens_per_image} image + "
            f"{plan.spec.audio.tokens(plan.spec.audio.max_frames)} audio rows))"
        ),
        "",
    ]
    total = len(plan.steps) + 1
    for index, step in enumerate(plan.steps, 1):
        state = "  (up to date: would skip)" if is_up_to_date(step) else ""
        lines.append(f"[{index}/{total}] {step.name}: {step.title}{state}")
        lines.append(f"  $ {step.command}")
        lines.extend(f"  writes {path}" for path in step.outputs)
        lines.append("")
    lines.append(f"[{total}/{total}] manifest: settings, artifacts and commands")
    lines.append(f"  writes {plan.manifest}")
    lines.append("")
    rows = [[s.name, str(len(s.outputs)), str(s.output_dir)] for s in plan.steps]
    rows.append(["manifest", "1", str(plan.manifest)])
    lines.append(format_table(["step", "files", "folder"], rows))
    lines.append(f"Dry run: {len(plan.steps)} commands, {len(plan.files())} files; nothing was run or written.")
    return "\n".join(lines)


def _run_step(step: BuildStep, log_path: Path) -> None:
    """Run one step of the plan (:func:`build_engines.steps.run_step`).

    Raises:
        GpuBuildError: The step failed; the message ends with its log tail.
    """
    try:
        run_step(step, log_path)
    except StepError as err:
        raise GpuBuildError(str(err)) from None


def run_plan(plan: GpuBuildPlan, *, force: bool = False) -> list[StepResult]:
    """Run every step in order, skipping steps whose identical command already finished.

    Args:
        plan: The plan (check :func:`preflight` first).
        force: Rerun steps that are up to date.

    Returns:
        One result per step.

    Raises:
        GpuBuildError: A step failed, or the built engine's world size is not the planned one.
    """
    problems = build_problems(plan)
    if problems:
        raise GpuBuildError("the model cannot be built; nothing was run:\n  " + "\n  ".join(problems))
    results: list[StepResult] = []
    total = len(plan.steps)
    for index, step in enumerate(plan.steps, 1):
        if not force and is_up_to_date(step):
            LOGGER.info("[%d/%d] %s: up to date, skipped", index, total, step.name)
            results.append(StepResult(step, "skipped"))
            continue
        LOGGER.info("[%d/%d] %s: %s", index, total, step.name, step.title)
        LOGGER.info("[%d/%d] $ %s", index, total, step.command)
        step.output_dir.mkdir(parents=True, exist_ok=True)
        stamp_path(step).unlink(missing_ok=True)
        started = time.monotonic()
        _run_step(step, plan.out / "logs" / f"{step.name}.log")
        seconds = time.monotonic() - started
        stamp_path(step).write_text(json.dumps({"argv": list(step.argv)}, indent=2) + "\n")
        LOGGER.info("[%d/%d] %s: done in %.0f s", index, total, step.name, seconds)
        results.append(StepResult(step, "built", seconds))
    world = engine_world_size(plan.engine_dir)
    if world != plan.llm.world_size:
        raise GpuBuildError(f"{plan.engine_dir}: engine world size {world}, planned {plan.llm.world_size}")
    plan.manifest.write_text(json.dumps(plan.manifest_data(), indent=2) + "\n")
    LOGGER.info("wrote %s", plan.manifest)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (2: bad input, 3: machine cannot build, 1: a step failed)."""
    parser = argparse.ArgumentParser(prog="python -m build_engines.trtllm_build", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="model spec (TOML)")
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder built from the spec")
    parser.add_argument("--out", type=Path, required=True, help="output folder for checkpoints, engines and plans")
    parser.add_argument("--dry-run", action="store_true", help="print every command and file in order; run nothing")
    parser.add_argument("--tp-size", type=int, default=2, help="tensor-parallel size (default 2)")
    parser.add_argument("--pp-size", type=int, default=1, help="pipeline-parallel size (default 1)")
    parser.add_argument("--max-num-tokens", type=int, default=None, help="override the tokens-per-step limit")
    parser.add_argument(
        "--stack", type=Path, default=STACK_FILE, help="pinned stack (default build_engines/stack.toml)"
    )
    parser.add_argument("--examples-dir", default=None, help="TensorRT-LLM examples folder (default from the stack)")
    parser.add_argument("--python", default=None, help="interpreter for convert_checkpoint.py (default from the stack)")
    parser.add_argument("--trtexec", default=None, help="trtexec binary (default from the stack, else PATH)")
    parser.add_argument("--force", action="store_true", help="rebuild steps that are up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        spec = load_spec(args.spec)
        plan = plan_gpu_build(
            spec,
            args.bundle,
            args.out,
            stack=load_stack(args.stack),
            tp_size=args.tp_size,
            pp_size=args.pp_size,
            max_num_tokens=args.max_num_tokens,
            python=args.python,
            examples_dir=args.examples_dir,
            trtexec=args.trtexec,
        )
        check_bundle_spec(plan)
    except (SpecError, StackError, GpuBuildError, FileNotFoundError) as err:
        LOGGER.error("%s", err)
        return 2
    problems = build_problems(plan)
    if problems:
        LOGGER.error("TensorRT-LLM cannot build this model; nothing was done:\n  - %s", "\n  - ".join(problems))
        return 2
    if args.dry_run:
        if not (args.bundle / "bundle.json").is_file():
            LOGGER.warning("%s has no bundle.json yet: the encoder graph names were not checked", args.bundle)
        print(describe_plan(plan))
        return 0

    problems = preflight(plan)
    if problems:
        LOGGER.error(
            "the GPU build cannot run on this machine; nothing was done:\n  - %s\n"
            "Run it inside %s on a GPU host, or use --dry-run to see the plan.",
            "\n  - ".join(problems),
            plan.stack.triton.image,
        )
        return 3
    started = time.monotonic()
    try:
        results = run_plan(plan, force=args.force)
    except (GpuBuildError, EngineConfigError) as err:
        LOGGER.error("%s", err)
        return 1
    rows = [[r.step.name, r.status, f"{r.seconds:.0f}", str(r.step.output_dir)] for r in results]
    rows.append(["manifest", "written", "", str(plan.manifest)])
    print(format_table(["step", "status", "seconds", "output"], rows))
    print(f"GPU build of {spec.name} finished in {time.monotonic() - started:.0f} s; engine {plan.engine_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
