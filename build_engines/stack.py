"""The pinned upstream stacks of the GPU images (``build_engines/stack.toml``).

One file names the Triton images, the TensorRT-LLM and TensorRT versions and
where their tools live inside the image (gpu-trtllm profile), and the vLLM image's
base, torch stack and wheel set (gpu-vllm profile). ``build_engines.trtllm_plan`` takes its tool
paths from here; the tests check that ``Dockerfile``, ``Dockerfile.vllm`` and ``docker-compose.yml``
use exactly these images and versions, so a version bump is one edit plus a green test run.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

STACK_FILE = Path(__file__).resolve().with_name("stack.toml")


class StackError(ValueError):
    """``stack.toml`` is missing a key, has an unknown key, or a value is not a string."""


@dataclass(frozen=True)
class TritonStack:
    """Triton images and paths inside the serving image."""

    image: str
    dali_source_image: str
    release: str
    tritonserver: str
    dali_pythonpath: str


@dataclass(frozen=True)
class TensorRTLLMStack:
    """TensorRT-LLM version and where its build tools are in the image."""

    version: str
    examples_dir: str
    python: str
    trtllm_build: str


@dataclass(frozen=True)
class TensorRTStack:
    """TensorRT version and ``trtexec``."""

    version: str
    trtexec: str


@dataclass(frozen=True)
class CudaStack:
    """CUDA toolkit and driver versions of the image (informational)."""

    version: str
    driver: str


@dataclass(frozen=True)
class PythonPackages:
    """Pins of what the Dockerfile adds to the image."""

    tritonclient: str


@dataclass(frozen=True)
class MonitoringStack:
    """Images of the ``monitoring`` compose profile."""

    prometheus_image: str
    grafana_image: str


@dataclass(frozen=True)
class VllmStack:
    """The gpu-vllm profile image: Triton base, vLLM, the torch stack and the pins checked at build time.

    Attributes:
        requirements: File (repository root) listing vLLM and its wheel set, installed with ``--no-deps``.
        wheels: How many pinned lines that file has (the reference wheel set's count).
        flashinfer_sampler: Value of ``VLLM_USE_FLASHINFER_SAMPLER`` in the image.
        tag: Name of the image compose builds.
    """

    version: str
    image: str
    dali_source_image: str
    release: str
    python: str
    cuda: str
    driver: str
    torch: str
    torchvision: str
    torchaudio: str
    torch_cuda: str
    torch_index: str
    numpy: str
    scipy: str
    transformers: str
    tritonclient: str
    requirements: str
    wheels: str
    flashinfer_sampler: str
    tag: str


@dataclass(frozen=True)
class OpenAIFrontendStack:
    """The OpenAI-compatible front door's image (``Dockerfile.openai``; CPU only).

    Attributes:
        base_image: The Python image it starts from.
        requirements: File (repository root) with the pinned packages it installs.
        tag: Name of the image compose builds.
        port: The port it listens on in its container.
    """

    base_image: str
    requirements: str
    tag: str
    port: str


@dataclass(frozen=True)
class Stack:
    """Everything ``stack.toml`` pins."""

    triton: TritonStack
    tensorrt_llm: TensorRTLLMStack
    tensorrt: TensorRTStack
    cuda: CudaStack
    python_packages: PythonPackages
    monitoring: MonitoringStack
    vllm: VllmStack
    openai_frontend: OpenAIFrontendStack


_TABLES: dict[str, type] = {
    "triton": TritonStack,
    "tensorrt_llm": TensorRTLLMStack,
    "tensorrt": TensorRTStack,
    "cuda": CudaStack,
    "python_packages": PythonPackages,
    "monitoring": MonitoringStack,
    "vllm": VllmStack,
    "openai_frontend": OpenAIFrontendStack,
}


def _table(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise StackError(f"{where}: expected a table")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    if unknown or missing:
        raise StackError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}")
    bad = sorted(k for k, v in data.items() if not isinstance(v, str) or not v)
    if bad:
        raise StackError(f"{where}: {bad} must be non-empty strings")
    return cls(**data)


def load_stack(path: str | Path = STACK_FILE) -> Stack:
    """Read and check ``stack.toml``.

    Args:
        path: The TOML file; the one beside this module by default.

    Returns:
        The pinned stack.

    Raises:
        StackError: A table or key is missing or unknown, or a value is not a non-empty string.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    unknown = sorted(set(data) - set(_TABLES))
    missing = sorted(set(_TABLES) - set(data))
    if unknown or missing:
        raise StackError(f"{path.name}: unknown table(s) {unknown}, missing table(s) {missing}")
    return Stack(**{name: _table(cls, data[name], f"{path.name} [{name}]") for name, cls in _TABLES.items()})
