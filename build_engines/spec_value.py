"""``python -m build_engines.spec_value --spec FILE KEY``: print one value of a model spec.

The Makefile reads the spec's name and tensor parallel size with it. The spec is read
by :func:`mmtriton.spec.load_spec`, so TOML spacing and quoting do not matter, the
spec is checked, and a key the spec leaves out reads as its default there. It needs
only the standard library (Python >= 3.11, for ``tomllib``): before ``make setup`` the
system ``python3`` can run it.

Examples:
    python3 -m build_engines.spec_value --spec build_engines/specs/tiny.toml name
    python3 -m build_engines.spec_value --spec build_engines/specs/glm4-9b-shape.toml serving.tensor_parallel_size
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from mmtriton.spec import ModelSpec, SpecError, load_spec


def spec_value(spec: ModelSpec, key: str) -> Any:
    """The value of ``key`` (``name``, ``seed`` or ``section.key``) in a loaded spec.

    Args:
        spec: The spec (defaults already filled in by :func:`mmtriton.spec.load_spec`).
        key: A top-level key or a dotted ``section.key``.

    Returns:
        The value.

    Raises:
        SpecError: No such key.
    """
    value: Any = spec
    for part in key.split("."):
        names = {f.name for f in dataclasses.fields(value)} - {"source"} if dataclasses.is_dataclass(value) else set()
        if part not in names:
            raise SpecError(f"no spec key {key!r}")
        value = getattr(value, part)
    if dataclasses.is_dataclass(value):
        raise SpecError(f"{key!r} is a section, not a value")
    return value


def format_value(value: Any) -> str:
    """A value as make and the shell read it: strings bare, everything else as JSON (``true``, ``1``, ``0.85``)."""
    return value if isinstance(value, str) else json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2: unreadable spec or unknown key)."""
    parser = argparse.ArgumentParser(prog="python -m build_engines.spec_value", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, required=True, help="model spec (TOML)")
    parser.add_argument("key", help="name, seed or section.key, e.g. serving.tensor_parallel_size")
    args = parser.parse_args(argv)
    try:
        value = spec_value(load_spec(args.spec), args.key)
    except (OSError, SpecError, ValueError) as err:
        # tomllib.TOMLDecodeError is a ValueError.
        sys.stderr.write(f"build_engines.spec_value: {args.spec}: {err}\n")
        return 2
    sys.stdout.write(format_value(value) + "\n")  # the value is this command's output
    return 0


if __name__ == "__main__":
    sys.exit(main())
