"""Stamped, resumable work: a step writes a stamp when it finishes, and a rerun skips it while it is current.

A stamp is a small JSON file holding the step's key: for a command step
(:class:`BuildStep`) its argv, for a render the content hash of its inputs. A rerun skips
a step whose stamp holds exactly its key and whose outputs exist, so an interrupted
multi-hour build resumes where it stopped and an unchanged repository is not rendered
again. Users: the TensorRT-LLM build plan (``build_engines/trtllm_build.py``) and the
renderer (``build_engines/render.py``).
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STAMP_NAME = ".gpu-step.json"


class StepError(RuntimeError):
    """A step exited non-zero or did not write the files it promises."""


@dataclass(frozen=True)
class BuildStep:
    """One command of the plan and the files it writes.

    Attributes:
        name: Short id, also the log file name.
        title: What the step does, for progress output.
        argv: The command.
        output_dir: Folder the step writes into (its stamp file lives there).
        outputs: Files the step writes, in the order a reader needs them.
    """

    name: str
    title: str
    argv: tuple[str, ...]
    output_dir: Path
    outputs: tuple[Path, ...]

    @property
    def command(self) -> str:
        """The command as one shell-quoted line."""
        return shlex.join(self.argv)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in (headers, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def stamp_path(step: BuildStep) -> Path:
    """The stamp file a finished step leaves in its output folder (holds its command)."""
    return step.output_dir / STAMP_NAME


def step_key(step: BuildStep) -> dict[str, Any]:
    """What a command step's stamp holds: its argv."""
    return {"argv": list(step.argv)}


def is_current(stamp: Path, key: dict[str, Any], outputs: Iterable[Path]) -> bool:
    """True when ``stamp`` holds every item of ``key`` unchanged and every output exists.

    Args:
        stamp: The stamp file.
        key: What identifies the work (an argv, an input hash).
        outputs: Files the work wrote.

    Returns:
        Whether the work can be skipped.
    """
    if not stamp.is_file() or not all(p.is_file() for p in outputs):
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and all(data.get(name) == value for name, value in key.items())


def write_stamp(stamp: Path, key: dict[str, Any]) -> None:
    """Record that the work identified by ``key`` finished (written last, after its outputs)."""
    stamp.write_text(json.dumps(key, indent=2) + "\n")


def is_up_to_date(step: BuildStep) -> bool:
    """True when a previous run of exactly this command finished and its outputs exist."""
    return is_current(stamp_path(step), step_key(step), step.outputs)


def content_digest(parts: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 over named byte strings (names and contents both count, in the order given).

    Args:
        parts: ``(name, content)`` pairs, e.g. a file's relative path and its bytes.

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for name, content in parts:
        for piece in (name.encode(), content):
            digest.update(len(piece).to_bytes(8, "little"))
            digest.update(piece)
    return digest.hexdigest()


@dataclass
class StepResult:
    """How one step of a real run went."""

    step: BuildStep
    status: str
    seconds: float = 0.0


def run_step(step: BuildStep, log_path: Path) -> None:
    """Run a step, teeing its output to the console and its log file.

    Raises:
        StepError: Non-zero exit; the message ends with the log tail.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {step.command}\n")
        proc = subprocess.Popen(
            list(step.argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(line)
            tail = (tail + [line.rstrip("\n")])[-40:]
        code = proc.wait()
    if code != 0:
        raise StepError(f"step {step.name} failed with exit code {code}; log {log_path}:\n" + "\n".join(tail))
    missing = [str(p) for p in step.outputs if not p.is_file()]
    if missing:
        raise StepError(f"step {step.name} exited 0 but did not write {missing}; log {log_path}")
