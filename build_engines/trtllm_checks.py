"""What stops a GPU build before it starts: the model, the machine, the bundle; and the engine it wrote.

:func:`build_problems` refuses a model TensorRT-LLM cannot build (a head size the GPT
attention plugin has no kernel for, :mod:`build_engines.trtllm_facts`), also before a
dry run prints. :func:`preflight` adds what this machine lacks for a real run (a GPU,
``trtllm-build``, ``trtexec``, the convert script, a complete bundle).

Engine folder facts: ``config.json`` = ``{version, pretrained_config, build_config}``
(``tensorrt_llm/builder.py`` ``EngineConfig.to_dict``), ``pretrained_config.mapping``
holds ``world_size, tp_size, pp_size, cp_size`` (``tensorrt_llm/mapping.py``
``to_dict``); the C++ runtime reads ``pretrained_config.mapping.tp_size`` and
``pp_size`` and loads ``rank<N>.engine`` (``cpp/tensorrt_llm/runtime/gptJsonConfig.cpp``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from build_engines.trtllm_commands import is_executable
from build_engines.trtllm_facts import head_size_problem
from build_engines.trtllm_plan import GpuBuildPlan
from build_engines.trtllm_settings import GpuBuildError
from mmtriton.serving.engine_folder import read_engine_mapping


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
    if not is_executable(trtexec) and shutil.which(trtexec) is None:
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
