"""Parsing ``config.pbtxt`` with Triton's own protobuf schema (shared by serving and build).

The renderer (``build_engines/render.py``) parses every config it writes; the TP
launcher reads the rendered ``tensorrt_llm`` config to find its engine. Both go
through :func:`parse_model_config`, so one schema decides what a valid config is.
"""

from __future__ import annotations

from typing import Any


class ModelConfigError(ValueError):
    """The text is not a valid Triton ``ModelConfig``."""


def parse_model_config(text: str, where: str) -> Any:
    """Parse a ``config.pbtxt`` text into ``model_config_pb2.ModelConfig``.

    Args:
        text: The config text.
        where: Name of its source, for the message.

    Returns:
        The parsed ``ModelConfig`` message.

    Raises:
        ModelConfigError: The text does not parse against the schema.
    """
    # protobuf + tritonclient: imported only when a config is read.
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    try:
        return text_format.Parse(text, mc.ModelConfig())
    except text_format.ParseError as err:
        raise ModelConfigError(f"{where}: not a valid Triton ModelConfig: {err}") from None
