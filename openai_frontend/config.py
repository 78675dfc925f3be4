"""What one front door serves and how it bounds requests: :class:`FrontendConfig`.

The model's limits (media bytes, ``max_output_len``, ``max_input_len``) are defined once,
in the model spec; :meth:`FrontendConfig.from_bundle` reads them from the bundle's
``bundle.json`` (the spec it was built from) and nothing here restates them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmtriton.spec import spec_from_dict
from openai_frontend.fetch import FetchPolicy
from openai_frontend.media import MediaLimits, longest_token_bytes

#: Room in the body limit for everything but the media and the prompt text (JSON syntax,
#: parameters, assistant turns, stop strings).
BODY_SLACK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class FrontendConfig:
    """Everything the front door needs to know.

    Attributes:
        triton_url: ``host:port`` of Triton's gRPC endpoint.
        model_name: The ``id`` under ``/v1/models`` and the ``model`` of every response.
        limits: Media counts and sizes per request.
        max_output_len: The largest ``max_tokens``, and the default when a request gives none
            (``llm.max_output_len``).
        fetch: The http(s) URL fetching policy.
        health_deadline_s: Deadline of each real inference ``/health`` sends.
        health_cache_s: How long a ``/health`` verdict is reused.
        metrics_on_api: Serve ``/metrics`` on the API port too (off when the metrics have a
            port of their own, so that a network policy can keep them to monitoring).
        max_input_len: The engine's longest prompt in tokens (``llm.max_input_len``); None: no
            prompt length check in the front door.
        token_bytes: The most text bytes one token stands for (:func:`longest_token_bytes`);
            None: no prompt length check in the front door.
        max_body_bytes: The largest request body; None: :func:`default_max_body_bytes`.
        body_timeout_s: Deadline for receiving a whole request body (408 after it).
    """

    triton_url: str
    model_name: str
    limits: MediaLimits
    max_output_len: int
    fetch: FetchPolicy = field(default_factory=FetchPolicy)
    health_deadline_s: float = 10.0
    health_cache_s: float = 5.0
    metrics_on_api: bool = True
    max_input_len: int | None = None
    token_bytes: int | None = None
    max_body_bytes: int | None = None
    body_timeout_s: float = 30.0

    @property
    def max_text_bytes(self) -> int | None:
        """The most system and user text bytes a prompt that fits can have (``max_input_len * L``), or None."""
        if self.max_input_len is None or self.token_bytes is None:
            return None
        return self.max_input_len * self.token_bytes

    @property
    def body_limit(self) -> int:
        """The request body limit in bytes: ``max_body_bytes``, or the one derived from the limits."""
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return default_max_body_bytes(self.limits, self.max_text_bytes)

    @classmethod
    def from_bundle(cls, bundle_dir: Path, triton_url: str, **overrides: Any) -> FrontendConfig:
        """Limits and the model name from a bundle's ``bundle.json`` (the model spec it was built from).

        Args:
            bundle_dir: The bundle folder (``build/bundles/<name>``).
            triton_url: Triton's gRPC ``host:port``.
            overrides: Any other field (``model_name``, ``fetch``, ...); None values are left out.

        Returns:
            The configuration.

        Raises:
            OSError: No readable ``bundle.json``.
            mmtriton.spec.SpecError: Its spec is not one this code reads.
        """
        spec = spec_from_dict(json.loads((Path(bundle_dir) / "bundle.json").read_text())["spec"])
        values: dict[str, Any] = {
            "triton_url": triton_url,
            "model_name": spec.name,
            "limits": MediaLimits.from_spec(spec),
            "max_output_len": spec.llm.max_output_len,
            "max_input_len": spec.llm.max_input_len,
            "token_bytes": longest_token_bytes(Path(bundle_dir) / "llm" / "tokenizer.json"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def default_max_body_bytes(limits: MediaLimits, max_text_bytes: int | None) -> int:
    """The largest request body a request within every limit can need.

    ``4/3`` of the image and the clip byte limits (base64), plus 5% for what JSON writers
    add inside base64 (``\\/`` for ``/``, line breaks); ``6x`` the prompt text bound (a
    ``\\u00XX`` escape is 6 bytes per byte of text; 64 bytes per token up to 8192 tokens when
    the bound is unknown); and :data:`BODY_SLACK_BYTES` for the rest.

    Args:
        limits: The media limits.
        max_text_bytes: :attr:`FrontendConfig.max_text_bytes`, or None.

    Returns:
        The limit in bytes.
    """
    media = 4 * math.ceil(limits.image_max_bytes / 3) * limits.max_images
    media += 4 * math.ceil(limits.audio_max_bytes / 3) * limits.max_audios
    text = max_text_bytes if max_text_bytes is not None else 8192 * 64
    return math.ceil(media * 1.05) + 6 * text + BODY_SLACK_BYTES
