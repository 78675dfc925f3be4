"""The bundle's manifest, ``bundle.json``: reading it, hashing the files it lists, and whether a bundle is current.

``bundle.json`` is written last (:func:`build_engines.bundle.build_bundle`), so a bundle
with one is complete. Nothing here imports torch or transformers: the up-to-date check
of ``python -m build_engines`` answers in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from build_engines.bundle_compat import _is_portable
from mmtriton.spec import ModelSpec

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
#: The folders of a bundle that are built (and replaced on a rebuild); bundle.json lists their files.
PARTS = ("llm", "vision_encoder", "audio_encoder")
# Files above this size (multi-GB weights of a 9B-shaped bundle) are recorded by size, not hashed.
HASH_LIMIT_BYTES = 1 << 30


class BundleError(RuntimeError):
    """A bundle is missing, incomplete, or failed a build-time check."""


def load_bundle(bundle_dir: Path) -> dict[str, Any]:
    """Read a bundle's ``bundle.json``.

    Args:
        bundle_dir: Directory given to :func:`build_engines.bundle.build_bundle`.

    Returns:
        The manifest, with ``"dir"`` set to ``bundle_dir`` as a string.

    Raises:
        BundleError: There is no readable ``bundle.json`` of a supported format.
    """
    path = Path(bundle_dir) / "bundle.json"
    if not path.is_file():
        raise BundleError(f"no bundle at {bundle_dir}: {path} is missing; build it with build_engines first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {data.get('format')!r}, expected {BUNDLE_FORMAT}; rebuild it")
    data["dir"] = str(bundle_dir)
    return data


def spec_data(spec: ModelSpec) -> dict[str, Any]:
    """The spec as ``bundle.json`` records it (as it reads back from JSON: tuples become lists)."""
    return json.loads(json.dumps(spec.to_dict()))


def bundle_is_current(out_dir: Path, spec: ModelSpec) -> bool:
    """True when ``out_dir`` holds a complete bundle built from exactly this spec.

    Args:
        out_dir: The bundle folder.
        spec: The model spec.

    Returns:
        Whether a build can be skipped; when it can, one log line says so.
    """
    out_dir = Path(out_dir)
    try:
        manifest = load_bundle(out_dir)
    except BundleError:
        return False
    if manifest.get("spec") != spec_data(spec):
        return False
    if not all((out_dir / rel).is_file() for rel in manifest.get("files", {})):
        return False
    # Bundles written before the transformers-4.57 compatibility fix are rebuilt.
    if not _is_portable(out_dir / "llm"):
        return False
    logger.info("bundle %s already built for spec %r; skipping (force=True rebuilds)", out_dir, spec.name)
    return True


def hash_files(out_dir: Path) -> dict[str, str]:
    """The ``files`` entry of ``bundle.json``: every file of the bundle's parts by relative path.

    Args:
        out_dir: The bundle folder.

    Returns:
        sha256 of each file (``size:<bytes>`` above :data:`HASH_LIMIT_BYTES`), sorted by path.
    """
    hashes: dict[str, str] = {}
    for name in PARTS:
        for path in sorted((out_dir / name).rglob("*")):
            if path.is_file() and path.stat().st_size > HASH_LIMIT_BYTES:
                hashes[path.relative_to(out_dir).as_posix()] = f"size:{path.stat().st_size}"
            elif path.is_file():
                digest = hashlib.sha256()
                with open(path, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                hashes[path.relative_to(out_dir).as_posix()] = digest.hexdigest()
    return dict(sorted(hashes.items()))

