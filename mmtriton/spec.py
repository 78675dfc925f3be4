"""Model spec: the one file that names a model's LLM, encoders and preprocessing constants.

A spec is TOML (see ``build_engines/specs/tiny.toml``). Every key is required
and unknown keys are errors, so a typo fails at build time instead of quietly
falling back to a default. The tiny random-weight bundle and a real checkpoint
use the same spec format; only ``checkpoint`` / ``path`` / ``onnx`` differ.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SpecError(ValueError):
    """The spec file is missing a key, has an unknown key, or a bad value."""


@dataclass(frozen=True)
class LLMSpec:
    """Decoder LLM: a Hugging Face checkpoint, or random weights of this shape."""

    family: str
    checkpoint: str
    dtype: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    max_input_len: int
    max_output_len: int


@dataclass(frozen=True)
class TokenizerSpec:
    """Tokenizer: a saved Hugging Face tokenizer, or one trained locally."""

    path: str
    vocab_size: int
    image_token: str
    audio_token: str


@dataclass(frozen=True)
class VisionSpec:
    """Vision encoder and the image preprocessing constants it was trained with."""

    onnx: str
    image_size: int
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int
    max_bytes: int

    @property
    def tokens_per_image(self) -> int:
        """Number of embedding rows one image contributes to the prompt table."""
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class AudioSpec:
    """Audio encoder and the MFCC constants it was trained with."""

    onnx: str
    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    n_mfcc: int
    preemphasis: float
    hidden_size: int
    num_layers: int
    num_heads: int
    subsampling: int
    max_seconds: float
    max_bytes: int
    cutoff_db: float
    norm_epsilon: float

    def frames(self, num_samples: int) -> int:
        """MFCC frames for ``num_samples`` at ``sample_rate`` (centered windows)."""
        return num_samples // self.hop_length + 1

    def tokens(self, frames: int) -> int:
        """Encoder output rows for ``frames`` MFCC frames (stride-2 convs, kernel 3, padding 1)."""
        out = frames
        for _ in range(self.subsampling.bit_length() - 1):
            out = (out - 1) // 2 + 1
        return out

    @property
    def max_frames(self) -> int:
        """MFCC frames of the longest audio clip accepted."""
        return self.frames(int(self.max_seconds * self.sample_rate))


@dataclass(frozen=True)
class ServingSpec:
    """Triton settings shared by the rendered model configs."""

    max_batch_size: int
    max_queue_delay_us: int
    preprocess_instances: int
    encoder_instances: int
    llm_queue_delay_us: int
    llm_max_queue_size: int
    batch_scheduler_policy: str
    kv_cache_free_gpu_mem_fraction: float
    enable_chunked_context: bool
    cancellation_check_period_ms: int
    # LLM engine settings with defaults (older specs and bundle.json files lack them).
    tensor_parallel_size: int = 1  # GPUs per LLM replica (vLLM; compose reserves this many)
    gpu_memory_utilization: float = 0.85  # vLLM: share of GPU memory for weights, activations, KV cache
    enforce_eager: bool = False  # vLLM: True turns CUDA graphs off
    enable_prefix_caching: bool = True  # vLLM: reuse KV blocks of shared prompt prefixes
    stream_chunk_rate: int = 1000  # streamed responses per second over all requests; 0 = every step


@dataclass(frozen=True)
class ModelSpec:
    """A whole multimodal model: what to build and how to serve it."""

    name: str
    seed: int
    llm: LLMSpec
    tokenizer: TokenizerSpec
    vision: VisionSpec
    audio: AudioSpec
    serving: ServingSpec
    source: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain data (``source`` left out), e.g. for ``bundle.json``."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.name != "source"]
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {unknown}; expected {sorted(names)}")
    optional = {f.name for f in fields if f.default is not dataclasses.MISSING}
    missing = sorted(names - set(data) - optional)
    if missing:
        raise SpecError(f"{where}: missing key(s) {missing}")
    values: dict[str, Any] = {}
    for f in fields:
        if f.name not in data:
            values[f.name] = f.default
            continue
        hint, value, key = hints[f.name], data[f.name], f"{where}.{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise SpecError(f"{key}: expected a table")
            values[f.name] = _build(hint, value, key)
        elif hint is bool:
            if not isinstance(value, bool):
                raise SpecError(f"{key}: expected true or false, got {value!r}")
            values[f.name] = value
        elif hint is int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SpecError(f"{key}: expected a non-negative integer, got {value!r}")
            values[f.name] = value
        elif hint is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"{key}: expected a number, got {value!r}")
            values[f.name] = float(value)
        elif hint is str:
            if not isinstance(value, str):
                raise SpecError(f"{key}: expected a string, got {value!r}")
            values[f.name] = value
        else:  # tuple[float, float, float]
            if not isinstance(value, (list, tuple)) or len(value) != 3:
                raise SpecError(f"{key}: expected a list of 3 numbers, got {value!r}")
            values[f.name] = tuple(float(v) for v in value)
    return cls(**values)


def _check(spec: ModelSpec, name: str) -> ModelSpec:
    """Checks across keys that the per-key types cannot express; returns ``spec``."""
    if spec.vision.image_size % spec.vision.patch_size:
        raise SpecError(f"{name}: vision.image_size must be a multiple of vision.patch_size")
    if spec.audio.subsampling & (spec.audio.subsampling - 1):
        raise SpecError(f"{name}: audio.subsampling must be a power of two")
    if spec.serving.tensor_parallel_size < 1:
        raise SpecError(f"{name}: serving.tensor_parallel_size must be at least 1")
    if not 0.0 < spec.serving.gpu_memory_utilization <= 1.0:
        raise SpecError(f"{name}: serving.gpu_memory_utilization must be in (0, 1]")
    if spec.serving.batch_scheduler_policy not in ("max_utilization", "guaranteed_no_evict"):
        raise SpecError(f"{name}: serving.batch_scheduler_policy must be max_utilization or guaranteed_no_evict")
    return spec


def load_spec(path: str | Path) -> ModelSpec:
    """Read and check a model spec.

    Args:
        path: TOML file.

    Returns:
        The parsed spec, with ``source`` set to the file it came from.

    Raises:
        SpecError: A key is missing, unknown, or has a value of the wrong kind.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    spec = _check(_build(ModelSpec, data, path.name), path.name)
    return dataclasses.replace(spec, source=path)


def spec_from_dict(data: dict[str, Any]) -> ModelSpec:
    """Rebuild a spec from :meth:`ModelSpec.to_dict` output (as stored in ``bundle.json``)."""
    return _build(ModelSpec, data, "bundle.json")


def with_overrides(spec: ModelSpec, overrides: dict[str, str]) -> ModelSpec:
    """A copy of ``spec`` with ``section.key`` values replaced (e.g. ``serving.max_batch_size=1``).

    Values are parsed as TOML values (``1``, ``0.5``, ``true``, ``"text"``); a bare
    word is taken as a string. The result goes through the same checks as a file.

    Raises:
        SpecError: Unknown key or a value of the wrong kind.
    """
    data = spec.to_dict()
    for dotted, raw in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in data or not isinstance(data[section], dict) or key not in data[section]:
            raise SpecError(f"override {dotted!r}: no such spec key")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        data[section][key] = value
    return dataclasses.replace(_check(_build(ModelSpec, data, "overrides"), "overrides"), source=spec.source)


def prompt_table_rows_per_request(spec: ModelSpec) -> int:
    """Prompt-table rows one request can need: one image plus the longest audio clip.

    The engine's table (TensorRT-LLM's ``max_prompt_embedding_table_size``, the CPU
    engine's ``prompt_table_capacity``) holds this many rows per running request.
    """
    return spec.vision.tokens_per_image + spec.audio.tokens(spec.audio.max_frames)
