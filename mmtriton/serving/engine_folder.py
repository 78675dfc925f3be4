"""Reading a built TensorRT-LLM engine folder (serving side).

The TP launcher needs the parallelism an engine was built for before it starts any
rank; the build plan (``build_engines/trtllm_checks.py``) uses the same reader to check what it
built. Only the standard library: the serving image imports this without build code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def _read_config(config: Path) -> dict | None:
    """The engine's ``config.json`` as a dict, or None when the file does not exist.

    Raises:
        EngineConfigError: The file is not a JSON object.
    """
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise EngineConfigError(f"{config}: not JSON ({err})") from None
    if not isinstance(data, dict):
        raise EngineConfigError(f"{config}: not a JSON object")
    return data


class EngineConfigError(ValueError):
    """A TensorRT-LLM engine folder is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class EngineMapping:
    """Parallelism an engine was built for (``pretrained_config.mapping`` of its ``config.json``)."""

    world_size: int
    tp_size: int
    pp_size: int
    cp_size: int


def read_engine_mapping(engine_dir: str | Path, *, check_rank_files: bool = True) -> EngineMapping:
    """Read the parallelism a TensorRT-LLM engine folder was built for.

    The key path is ``pretrained_config.mapping`` of the engine's ``config.json``
    (``world_size``, ``tp_size``, ``pp_size``, ``cp_size``), as written by
    ``trtllm-build``; the runtime loads one ``rank<N>.engine`` per rank.

    Args:
        engine_dir: Folder written by ``trtllm-build --output_dir``.
        check_rank_files: Also require ``rank0.engine`` .. ``rank<world-1>.engine``.

    Returns:
        The mapping.

    Raises:
        EngineConfigError: No ``config.json``, a missing or non-integer key,
            ``world_size`` different from ``tp_size x pp_size x cp_size``, or a
            missing rank engine file.
    """
    engine_dir = Path(engine_dir)
    config = engine_dir / "config.json"
    data = _read_config(config)
    if data is None:
        raise EngineConfigError(
            f"{config} not found: {engine_dir} is not a TensorRT-LLM engine folder (trtllm-build output)"
        )
    mapping = data.get("pretrained_config", {}).get("mapping")
    if not isinstance(mapping, dict):
        raise EngineConfigError(f"{config}: no pretrained_config.mapping (not a TensorRT-LLM engine config)")

    def _int(key: str, default: int | None) -> int:
        value = mapping.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EngineConfigError(
                f"{config}: pretrained_config.mapping.{key} must be a positive integer, got {value!r}"
            )
        return value

    tp, pp, cp = _int("tp_size", None), _int("pp_size", 1), _int("cp_size", 1)
    world = _int("world_size", tp * pp * cp)
    if world != tp * pp * cp:
        raise EngineConfigError(
            f"{config}: pretrained_config.mapping.world_size {world} != tp_size {tp} x pp_size {pp} x cp_size {cp}"
        )
    if check_rank_files:
        missing = [f"rank{r}.engine" for r in range(world) if not (engine_dir / f"rank{r}.engine").is_file()]
        if missing:
            raise EngineConfigError(f"{engine_dir}: world size {world} but {missing} missing (incomplete build?)")
    return EngineMapping(world_size=world, tp_size=tp, pp_size=pp, cp_size=cp)


def read_engine_dtype(engine_dir: str | Path) -> str | None:
    """The dtype a built engine's weights (and so its prompt table) have, or None before the build.

    ``pretrained_config.dtype`` of the engine's ``config.json``, the key the C++ runtime
    reads (``cpp/tensorrt_llm/runtime/gptJsonConfig.cpp`` ``parseJson``, index commit b57221b7).

    Raises:
        EngineConfigError: ``config.json`` exists but has no string ``pretrained_config.dtype``.
    """
    config = Path(engine_dir) / "config.json"
    data = _read_config(config)
    if data is None:
        return None
    dtype = data.get("pretrained_config", {}).get("dtype")
    if not isinstance(dtype, str):
        raise EngineConfigError(f"{config}: no pretrained_config.dtype (not a TensorRT-LLM engine config)")
    return dtype
