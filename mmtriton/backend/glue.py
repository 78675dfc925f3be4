"""Helpers every python-backend ``model.py`` shares: parameters, optional inputs, errors.

The models stay thin adapters (read tensors, call the runtime, build responses); what
they all do the same way lives here once. ``triton_python_backend_utils`` exists only
inside a python backend stub, so it is imported where a helper needs it.
"""

from __future__ import annotations

import json
from typing import Any


def model_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The ``parameters`` of the model's ``config.pbtxt``, as ``name -> string_value``.

    Args:
        args: The dict Triton passes to ``initialize``.
    """
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def optional_input(request: Any, name: str) -> Any:
    """Input ``name`` of ``request`` as a numpy array, or None when the client did not send it."""
    import triton_python_backend_utils as pb_utils

    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def scalar_input(request: Any, name: str, default: Any = None) -> Any:
    """The single value of input ``name`` as a Python scalar, or ``default`` when absent."""
    value = optional_input(request, name)
    return default if value is None else value.reshape(-1)[0].item()


def error_response(message: str, code: str = "INVALID_ARG") -> Any:
    """An ``InferenceResponse`` carrying only an error.

    Args:
        message: What the client sees (names the input and the limit for bad input).
        code: A ``pb_utils.TritonError`` code name: ``INVALID_ARG`` (the client's input)
            or ``INTERNAL`` (the server's own failure).
    """
    import triton_python_backend_utils as pb_utils

    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))
