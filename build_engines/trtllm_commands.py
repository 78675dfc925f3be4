"""The three commands of the GPU build, as stamped steps (:class:`build_engines.steps.BuildStep`).

1. ``convert_checkpoint.py`` of the spec's LLM family: Hugging Face checkpoint
   (``<bundle>/llm``) -> TensorRT-LLM checkpoint split for ``tp_size`` ranks.
2. ``trtllm-build``: one engine per rank with in-flight batching settings (paged
   KV cache, packed input, context FMHA on the paged cache) and room for the
   prompt table of every running request's image and longest audio clip.
3. ``trtexec``: FP16 TensorRT plan of the vision encoder ONNX.

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
  ``enable``/``disable``. ``--workers`` is capped at the visible GPU count. It writes
  ``config.json`` and ``rank<N>.engine``.
- Examples live at ``/app/examples`` in the Triton TensorRT-LLM image:
  triton-inference-server/tensorrtllm_backend ``dockerfile/Dockerfile.triton.trt_llm_backend``
  (branch r26.07).
- ``trtexec`` flags ``--onnx= --saveEngine= --fp16 --minShapes= --optShapes=
  --maxShapes= --inputIOFormats= --outputIOFormats= --skipInference``, shape spec
  ``name:AxBxC,name2:D``, IO types incl. ``fp16``/``fp32``/``int64`` with format ``chw``:
  NVIDIA/TensorRT ``samples/common/sampleOptions.cpp`` (help text). Newer TensorRT
  marks ``--fp16`` deprecated in favour of strong typing; 10.14 still accepts it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from build_engines.encoder_io import VISION_IO, EncoderIO, read_onnx_io
from build_engines.stack import Stack
from build_engines.steps import BuildStep
from build_engines.trtllm_settings import GpuBuildError, LLMBuildSettings

Shapes = dict[str, tuple[int, ...]]


def check_io(path: Path, expected: EncoderIO) -> bool:
    """Compare an ONNX file's graph names with the bundle layout.

    Args:
        path: The ONNX file.
        expected: The names it must have (:mod:`build_engines.encoder_io`).

    Returns:
        True when the file was read and matches; False when it could not be read here.

    Raises:
        GpuBuildError: The file was read and its names differ.
    """
    found = read_onnx_io(path)
    if found is None:
        return False
    if found != expected:
        raise GpuBuildError(
            f"{path}: graph inputs {list(found.inputs)} / outputs {list(found.outputs)}; "
            f"the bundle layout needs {list(expected.inputs)} / {list(expected.outputs)}"
        )
    return True


def _shapes(shapes: Shapes) -> str:
    """trtexec shape spec: ``name:AxBxC,name2:D``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def trtexec_argv(
    trtexec: str,
    onnx_path: Path,
    plan: Path,
    profile: tuple[Shapes, Shapes, Shapes],
    input_formats: Sequence[str],
    output_formats: Sequence[str],
) -> tuple[str, ...]:
    """The ``trtexec`` command that builds an FP16 plan with one optimization profile.

    Args:
        trtexec: The binary.
        onnx_path: The ONNX graph.
        plan: Where the plan is saved.
        profile: Minimum, optimum and maximum shapes by input name.
        input_formats: One ``type:format`` per graph input, in graph order.
        output_formats: One ``type:format`` per graph output, in graph order.

    Returns:
        The argv.
    """
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


def is_executable(path: str) -> bool:
    """True when ``path`` names an executable file (not looked up on PATH)."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


def resolve_trtexec(configured: str) -> str | None:
    """The configured ``trtexec`` if it exists, else the one on PATH, else None."""
    if is_executable(configured):
        return configured
    return shutil.which(configured) or shutil.which("trtexec")


def convert_step(llm: LLMBuildSettings, python: str, examples: str, bundle: Path, checkpoint_dir: Path) -> BuildStep:
    """``convert_checkpoint.py``: the bundle's Hugging Face checkpoint split for every rank.

    Args:
        llm: The engine settings.
        python: Interpreter that runs the script.
        examples: TensorRT-LLM examples folder.
        bundle: Bundle folder (``llm/`` is the checkpoint).
        checkpoint_dir: Where the TensorRT-LLM checkpoint goes.

    Returns:
        The step.
    """
    ranks = range(llm.world_size)
    return BuildStep(
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


def engine_step(llm: LLMBuildSettings, stack: Stack, checkpoint_dir: Path, engine_dir: Path) -> BuildStep:
    """``trtllm-build``: one engine per rank with the in-flight batching settings.

    Args:
        llm: The engine settings.
        stack: The pinned stack (names the ``trtllm-build`` binary).
        checkpoint_dir: The converted checkpoint.
        engine_dir: Where the engines go.

    Returns:
        The step.
    """
    ranks = range(llm.world_size)
    return BuildStep(
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


def vision_step(trtexec: str, bundle: Path, vision_dir: Path, batch: int, size: int) -> BuildStep:
    """``trtexec``: the FP16 plan of the vision encoder for batch 1..``batch``.

    An ONNX file already in the bundle is checked against :data:`VISION_IO` first.

    Args:
        trtexec: The binary.
        bundle: Bundle folder (``vision_encoder/model.onnx``).
        vision_dir: Where the plan goes (``model.plan``).
        batch: Largest batch (the spec's ``serving.max_batch_size``).
        size: Image side (the spec's ``vision.image_size``).

    Returns:
        The step.

    Raises:
        GpuBuildError: The bundle's vision ONNX does not have the bundle layout's graph names.
    """
    vision_onnx = bundle / "vision_encoder" / "model.onnx"
    check_io(vision_onnx, VISION_IO)
    plan = vision_dir / "model.plan"

    def pixels(b: int) -> Shapes:
        return {VISION_IO.inputs[0]: (b, 3, size, size)}

    return BuildStep(
        name="vision-plan",
        title=f"TensorRT plan of the vision encoder (FP16, batch 1..{batch})",
        # pixel_values arrives as FP16 from image_preprocess and embeddings leave as FP16.
        argv=trtexec_argv(
            trtexec, vision_onnx, plan, (pixels(1), pixels(batch), pixels(batch)), ["fp16:chw"], ["fp16:chw"]
        ),
        output_dir=vision_dir,
        outputs=(plan,),
    )
