"""Which Triton backends the gpu-profile serving image carries.

The image is ``stack.toml``'s ``triton.image`` (``-trtllm-python-py3``) plus the backend
folders the ``Dockerfile`` copies in from the same release's full ``-py3`` image. A
rendered gpu repository may only name backends from that set; tests check it.

Sources:

- Base image: triton-inference-server/tensorrtllm_backend branch ``r26.07``
  (commit ``3bc115373ce1fde1d94891964b492449402e3a68``), ``docs/build.md``: the Triton
  TRT-LLM container includes TensorRT-LLM with the TensorRT-LLM backend and the
  Python backend. Ensembles are Triton core's ``platform: "ensemble"``, not a backend.
- Copied in: the ``COPY --from=<stage> /opt/tritonserver/backends/<name> ...`` lines of
  the repository's ``Dockerfile`` (:func:`copied_backends` reads them).
"""

from __future__ import annotations

import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parent.parent / "Dockerfile"
BACKENDS_DIR = "/opt/tritonserver/backends"

#: Backends the ``-trtllm-python-py3`` image ships (tensorrtllm_backend r26.07 docs/build.md).
BASE_IMAGE_BACKENDS: frozenset[str] = frozenset({"tensorrtllm", "python"})

_COPY = re.compile(
    rf"^COPY\s+--from=(?P<stage>\S+)\s+{re.escape(BACKENDS_DIR)}/(?P<src>[\w.-]+)/?\s+"
    rf"{re.escape(BACKENDS_DIR)}/(?P<dst>[\w.-]+)/?\s*$",
    flags=re.MULTILINE,
)


def copied_backends(dockerfile: str | Path = DOCKERFILE) -> frozenset[str]:
    """Backend folders the Dockerfile copies from another image, by destination name.

    Only whole-folder copies from a build stage into ``/opt/tritonserver/backends/<name>``
    with the same name on both sides count.
    """
    text = Path(dockerfile).read_text()
    return frozenset(m["dst"] for m in _COPY.finditer(text) if m["src"] == m["dst"])


def image_backends(dockerfile: str | Path = DOCKERFILE) -> frozenset[str]:
    """Every backend the serving image has: the base image's plus the copied ones."""
    return BASE_IMAGE_BACKENDS | copied_backends(dockerfile)


def missing_backends(backends_used: set[str], dockerfile: str | Path = DOCKERFILE) -> list[str]:
    """Backends a repository names that the image does not have, sorted."""
    return sorted(set(backends_used) - image_backends(dockerfile))
