"""GPU build: TensorRT-LLM engines (TP=2 by default) and the TensorRT vision-encoder plan for one model spec.

``python -m build_engines.trtllm_build`` runs, in the pinned TensorRT-LLM image
(``build_engines/stack.toml``), the three commands of the plan:
``convert_checkpoint.py`` (Hugging Face -> TensorRT-LLM checkpoint split for ``tp_size``
ranks), ``trtllm-build`` (one engine per rank) and ``trtexec`` (the vision encoder's FP16
plan). There is no audio-encoder plan: the gpu-trtllm profile serves the audio encoder on
the python backend (PyTorch on the GPU).

    python -m build_engines.trtllm_build --spec build_engines/specs/tiny-gpu.toml \\
        --bundle build/bundles/tiny-gpu --out build/engines/tiny-gpu --dry-run

``--dry-run`` prints every command and file in order and runs nothing. A real run first
checks for a GPU (``nvidia-smi``), ``trtllm-build``, ``trtexec``, the convert script and
the bundle, and stops before doing anything if one is missing. Steps are stamped
(:mod:`build_engines.steps`): a rerun resumes after the last finished one.

Where the parts live:

- :mod:`build_engines.trtllm_settings`: the engine settings derived from the spec (TP size default);
- :mod:`build_engines.trtllm_commands`: the three commands and the upstream flags they use;
- :mod:`build_engines.trtllm_plan`: the plan, its folders, ``gpu_build.json`` and the dry-run text;
- :mod:`build_engines.trtllm_checks`: what refuses a build before it starts, and the engine's world size;
- this module: running the plan, and the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from build_engines.stack import STACK_FILE, StackError, load_stack
from build_engines.steps import (
    BuildStep,
    StepError,
    StepResult,
    format_table,
    is_up_to_date,
    run_step,
    stamp_path,
    step_key,
    write_stamp,
)
from build_engines.trtllm_checks import build_problems, check_bundle_spec, engine_world_size, preflight
from build_engines.trtllm_plan import GpuBuildPlan, describe_plan, plan_gpu_build
from build_engines.trtllm_settings import TP_SIZE, GpuBuildError
from mmtriton.serving.engine_folder import EngineConfigError
from mmtriton.spec import SpecError, load_spec

LOGGER = logging.getLogger(__name__)


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

    ``gpu_build.json`` is written last, after the engine's world size was checked.

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
    # gpu_build.json stands for a finished build (the renderer plans from it): an earlier one goes first.
    plan.manifest.unlink(missing_ok=True)
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
        write_stamp(stamp_path(step), step_key(step))
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
    parser.add_argument("--tp-size", type=int, default=TP_SIZE, help=f"tensor-parallel size (default {TP_SIZE})")
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
