"""The GPU build plan of one model spec: its steps in order, the files they write, its manifest.

:func:`plan_gpu_build` puts the engine settings (:mod:`build_engines.trtllm_settings`)
and the three commands (:mod:`build_engines.trtllm_commands`) together; nothing is
run or written. Folders are named by their settings, e.g.
``tiny-gpu-tp2-fp16-bs8-in1024-seq1280-ptable6520``; ``gpu_build.json`` in the output
folder records the settings, the commands and where each artifact is, for the
gpu-profile renderer (:func:`plan_for_engines`) and the TP launcher.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engines.stack import Stack, load_stack
from build_engines.steps import BuildStep, format_table, is_up_to_date
from build_engines.trtllm_commands import convert_step, engine_step, resolve_trtexec, vision_step
from build_engines.trtllm_settings import TP_SIZE, GpuBuildError, LLMBuildSettings, llm_settings
from mmtriton.spec import ModelSpec

LOGGER = logging.getLogger(__name__)

MANIFEST_NAME = "gpu_build.json"


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


def plan_gpu_build(
    spec: ModelSpec,
    bundle: Path,
    out: Path,
    *,
    stack: Stack | None = None,
    tp_size: int = TP_SIZE,
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
        tp_size: Tensor-parallel size (:data:`~build_engines.trtllm_settings.TP_SIZE` by default).
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
    batch = spec.serving.max_batch_size
    size = spec.vision.image_size
    vision = vision_step(trtexec_bin, bundle, out / f"{name}-vision-fp16-bs{batch}-s{size}", batch, size)

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
        vision_plan=vision.outputs[0],
        steps=(
            convert_step(llm, python, examples, bundle, checkpoint_dir),
            engine_step(llm, stack, checkpoint_dir, engine_dir),
            vision,
        ),
        tools={"python": python, "examples_dir": examples, "trtexec": trtexec_bin},
    )


def plan_for_engines(spec: ModelSpec, bundle: Path, out: Path, *, stack: Stack | None = None) -> GpuBuildPlan:
    """The plan whose engines are, or will be, in ``out``.

    A build that finished there recorded its parallel sizes and tokens per step in
    ``gpu_build.json``; the plan is made with those, so its folders are the ones that
    build wrote (whatever ``--tp-size`` it was given). With no ``gpu_build.json`` yet the
    plan has the defaults of :func:`plan_gpu_build`.

    Args:
        spec: The model spec.
        bundle: Bundle folder.
        out: The output folder of ``python -m build_engines.trtllm_build``.
        stack: Pinned stack; ``build_engines/stack.toml`` by default.

    Returns:
        The plan.

    Raises:
        GpuBuildError: ``gpu_build.json`` cannot be read, records another spec, or its
            settings cannot be planned for this spec.
    """
    manifest = Path(out) / MANIFEST_NAME
    if not manifest.is_file():
        return plan_gpu_build(spec, bundle, out, stack=stack)
    try:
        data = json.loads(manifest.read_text())
        recorded = data["llm"]
        settings = {key: int(recorded[key]) for key in ("tp_size", "pp_size", "max_num_tokens")}
        built = Path(recorded["engine_dir"]).name
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise GpuBuildError(f"{manifest} cannot be read as a GPU build manifest: {err!r}") from None
    if data.get("spec") != spec.name:
        raise GpuBuildError(f"{manifest} records a build of spec {data.get('spec')!r}, not {spec.name!r}")
    plan = plan_gpu_build(spec, bundle, out, stack=stack, **settings)
    if plan.engine_dir.name != built:
        LOGGER.warning(
            "%s: the build wrote engine %s, this spec plans %s (settings changed since; rebuild the engines)",
            manifest,
            built,
            plan.engine_dir.name,
        )
    LOGGER.info(
        "tensorrt_llm: tp_size %d, pp_size %d as built (%s)", plan.llm.tp_size, plan.llm.pp_size, manifest
    )
    return plan


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
