"""``python -m build_engines``: build a model bundle and render a model repository.

Examples:
    python -m build_engines bundle --spec build_engines/specs/tiny.toml --out build/bundles/tiny-mm
    python -m build_engines render --bundle build/bundles/tiny-mm --profile cpu --out build/repo-cpu-tiny-mm
    python -m build_engines all --spec build_engines/specs/tiny.toml --profile cpu --build-dir build
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from build_engines.bundle_manifest import bundle_is_current
from build_engines.render import PROFILES, RenderError, render_repository
from mmtriton.spec import SpecError, load_spec

LOGGER = logging.getLogger("build_engines")


def _bundle(spec_path: Path, out: Path, force: bool, device: str = "cpu") -> Path:
    """The bundle of a spec, built unless ``out`` already holds it (checked without importing torch)."""
    spec = load_spec(spec_path)
    if not force and bundle_is_current(out, spec):
        return out
    from build_engines.bundle import build_bundle  # torch import is slow; only when needed

    return build_bundle(spec, out, force=force, device=device)


def _gpu_engines(spec_path: Path, bundle: Path, engines: Path) -> None:
    """Build the TensorRT-LLM engines and encoder plans where a GPU and the tools exist.

    Elsewhere (CI) the full build plan is printed and the step is reported as skipped;
    the gpu repository is still rendered and checked.
    """
    from build_engines.trtllm_build import run_plan
    from build_engines.trtllm_checks import preflight
    from build_engines.trtllm_plan import describe_plan, plan_gpu_build

    plan = plan_gpu_build(load_spec(spec_path), bundle, engines)
    missing = preflight(plan)
    if missing:
        LOGGER.warning("skipped the GPU build (%s); this is the plan it would run:", "; ".join(missing))
        print(describe_plan(plan))  # noqa: T201 - the plan is this command's output
        return
    run_plan(plan)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="build_engines", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_bundle = sub.add_parser("bundle", help="build the model bundle a spec describes")
    p_bundle.add_argument("--spec", type=Path, required=True)
    p_bundle.add_argument("--out", type=Path, required=True)
    p_bundle.add_argument("--force", action="store_true", help="rebuild even if the bundle is up to date")
    p_bundle.add_argument("--device", default="cpu", help="where random LLM weights are made (cuda for 9B shapes)")
    p_render = sub.add_parser("render", help="render and check a model repository for a profile")
    p_render.add_argument("--bundle", type=Path, required=True)
    p_render.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p_render.add_argument("--out", type=Path, required=True)
    p_render.add_argument("--engines", type=Path, help="gpu-trtllm profile: the folder python -m build_engines.trtllm_build writes")
    p_render.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a spec value for this repository only, e.g. serving.max_batch_size=1",
    )
    p_render.add_argument("--force", action="store_true", help="render even if nothing changed since the last render")
    p_all = sub.add_parser("all", help="bundle, then render (folders named by spec and profile)")
    p_all.add_argument("--spec", type=Path, required=True)
    p_all.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    p_all.add_argument("--build-dir", type=Path, default=Path("build"))
    p_all.add_argument("--force", action="store_true", help="rebuild the bundle and render even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    started = time.monotonic()
    try:
        if args.command == "bundle":
            _bundle(args.spec, args.out, args.force, args.device)
        elif args.command == "render":
            bad = [item for item in args.set if "=" not in item]
            if bad:
                parser.error(f"--set expects SECTION.KEY=VALUE, got {bad}")
            overrides = dict(item.split("=", 1) for item in args.set)
            render_repository(
                args.bundle, args.out, args.profile, overrides=overrides, engines_dir=args.engines, force=args.force
            )
        else:
            name = load_spec(args.spec).name
            bundle = _bundle(args.spec, args.build_dir / "bundles" / name, args.force)
            engines = args.build_dir / "engines" / name
            if args.profile == "gpu-trtllm":
                _gpu_engines(args.spec, bundle, engines)
            repo = args.build_dir / f"repo-{args.profile}-{name}"
            render_repository(bundle, repo, args.profile, engines_dir=engines, force=args.force)
    except (SpecError, RenderError, FileNotFoundError) as err:
        LOGGER.error("%s", err)
        return 2
    LOGGER.info("done in %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
