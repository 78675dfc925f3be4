"""The render's stamp: a content hash of everything a rendered repository depends on.

A repository is rendered again only when one of its inputs changed since the last
render into the same folder (:func:`build_engines.render.render_repository` skips it
otherwise, in one log line). The inputs:

- the bundle's place and its ``bundle.json``: the spec it was built from and the sha256
  of every file in it (a changed spec rebuilds the bundle, so it counts here too);
- the profile, the ``--set`` overrides and, when given, the ensemble descriptions;
- every file under the template folder (``model_repository/``);
- the renderer's own code: every module of ``build_engines`` and ``stack.toml``, and
  the runtime modules it reads specs, contracts, configs and engine folders with;
- gpu-trtllm: where the engine and the vision plan are, ``gpu_build.json`` and the
  engine's ``config.json`` (their bytes) and the vision plan (its size and modification
  time), or that they are absent.

The stamp (``.render-stamp.json`` in the repository) also records the size and
modification time of every file the render wrote: a repository edited or damaged by
hand is rendered again too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from build_engines.steps import content_digest, is_current, write_stamp
from mmtriton import contract
from mmtriton import spec as spec_module
from mmtriton.serving import engine_folder, triton_config

STAMP_NAME = ".render-stamp.json"
BUILD_CODE = Path(__file__).resolve().parent
#: Runtime modules whose code decides what a render writes.
RUNTIME_MODULES = (spec_module, contract, triton_config, engine_folder)


def _files(root: Path, pattern: str = "*") -> list[Path]:
    """Files under ``root`` matching ``pattern``, sorted, Python caches left out."""
    return sorted(p for p in root.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts)


def code_files() -> list[Path]:
    """The renderer's own code: ``build_engines/*.py``, ``stack.toml`` and :data:`RUNTIME_MODULES`."""
    files = sorted(BUILD_CODE.glob("*.py")) + [BUILD_CODE / "stack.toml"]
    return files + [Path(module.__file__).resolve() for module in RUNTIME_MODULES if module.__file__]


def _file_state(path: Path, *, content: bool) -> bytes:
    """A file's bytes (``content``) or its size and modification time; ``absent`` when missing."""
    if not path.is_file():
        return b"absent"
    if content:
        return path.read_bytes()
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}".encode()


def render_key(
    bundle_dir: Path,
    profile: str,
    overrides: dict[str, str],
    template_root: Path,
    *,
    ensembles: Sequence[Any] | None = None,
    engine_files: Iterable[Path] = (),
    plan_files: Iterable[Path] = (),
) -> dict[str, Any]:
    """The stamp key of one render: ``{"inputs": <sha256 of every input>}``.

    Args:
        bundle_dir: The bundle (its ``bundle.json`` counts).
        profile: Profile name.
        overrides: Spec overrides of this repository.
        template_root: The template folder (every file in it counts).
        ensembles: Ensemble descriptions given instead of the profile's (their repr counts).
        engine_files: Small files whose bytes count (``gpu_build.json``, the engine's ``config.json``).
        plan_files: Large built files whose size and modification time count (the vision plan).

    Returns:
        The key, for :func:`is_unchanged` and :func:`write_render_stamp`.
    """
    parts: list[tuple[str, bytes]] = [
        ("profile", profile.encode()),
        ("overrides", json.dumps(overrides, sort_keys=True).encode()),
        ("ensembles", repr(tuple(ensembles)).encode() if ensembles is not None else b"profile default"),
        # Absolute paths into the bundle (tokenizer, checkpoint) are written into the configs.
        ("bundle", str(Path(bundle_dir).resolve()).encode()),
        ("bundle.json", _file_state(Path(bundle_dir) / "bundle.json", content=True)),
    ]
    parts += [(f"template:{p.relative_to(template_root)}", p.read_bytes()) for p in _files(Path(template_root))]
    parts += [(f"code:{p.name}", p.read_bytes()) for p in code_files()]
    parts += [(f"engine:{p.resolve()}", _file_state(p, content=True)) for p in engine_files]
    parts += [(f"plan:{p.resolve()}", _file_state(p, content=False)) for p in plan_files]
    return {"inputs": content_digest(parts)}


def _written(repo: Path, names: Iterable[str]) -> dict[str, list[int] | None]:
    """Size and modification time of each named file of ``repo`` (None when it is gone)."""
    state: dict[str, list[int] | None] = {}
    for name in names:
        path = repo / name
        state[name] = [path.stat().st_size, path.stat().st_mtime_ns] if path.is_file() else None
    return state


def is_unchanged(repo: Path, key: dict[str, Any]) -> bool:
    """True when ``repo`` was rendered from exactly these inputs and its files are as that render left them.

    Args:
        repo: The repository folder.
        key: :func:`render_key` of the render about to run.

    Returns:
        Whether the render can be skipped.
    """
    stamp = repo / STAMP_NAME
    try:
        recorded = json.loads(stamp.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(recorded, dict) or not recorded:
        return False
    return is_current(stamp, {**key, "files": _written(repo, recorded)}, ())


def write_render_stamp(repo: Path, key: dict[str, Any]) -> None:
    """Stamp a finished render: its key and the size and modification time of every file in ``repo``.

    Args:
        repo: The rendered folder (written last, once every file is in place).
        key: :func:`render_key` of this render.
    """
    names = [p.relative_to(repo).as_posix() for p in _files(repo) if p.name != STAMP_NAME]
    write_stamp(repo / STAMP_NAME, {**key, "files": _written(repo, names)})
