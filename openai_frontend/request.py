"""The chat completion request: its model, the fields this server refuses, and its checks.

A decoded body goes through :func:`read_request`: a field whose effect this server cannot
give (:data:`REFUSED_FIELDS`) is refused unless it carries its neutral value, then the
fields this server reads are validated (:class:`ChatCompletionRequest`). :func:`sampling_of`
turns them into the ensembles' sampling inputs, refusing values out of range, and
:func:`check_prompt_bytes` refuses a prompt whose text alone cannot fit the engine. Every
refusal is a 400 naming the field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from clients.llm import Sampling
from openai_frontend.config import FrontendConfig
from openai_frontend.errors import APIError, bad_request

#: Largest ``seed`` the ensembles take (UINT64).
_MAX_SEED = 2**64 - 1
#: Largest ``top_k`` the ensembles take (INT32).
_MAX_TOP_K = 2**31 - 1
#: ``temperature`` range (OpenAI's).
_TEMPERATURE_RANGE = (0.0, 2.0)


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool | None = False


class ChatCompletionRequest(BaseModel):
    """The fields of a chat completion request this server reads; any other field is ignored,
    except the ones whose effect this server cannot give (:data:`REFUSED_FIELDS`), which are
    refused unless they carry their neutral value.

    ``enable_thinking`` and ``return_reasoning`` are what OpenAI clients send through
    ``extra_body`` for reasoning models: ``enable_thinking`` (also read from
    ``chat_template_kwargs``) goes to the chat template; ``return_reasoning`` is accepted.
    ``top_k`` and ``ignore_eos`` (every answer runs to ``max_tokens``: benchmarks) are
    extensions in vLLM's dialect.
    """

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Any]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool | None = None
    enable_thinking: bool | None = None
    return_reasoning: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def thinking(self) -> bool | None:
        """``enable_thinking`` for the chat template: the field, else ``chat_template_kwargs``'s, else None."""
        if self.enable_thinking is not None:
            return self.enable_thinking
        value = (self.chat_template_kwargs or {}).get("enable_thinking")
        return value if isinstance(value, bool) else None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a chunk carrying ``usage``."""
        return bool(self.stream_options and self.stream_options.include_usage)


def _zero(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool) and value == 0)


_NO_LOGPROBS = "log probabilities are not supported by this server"
_NO_TOOLS = "tool and function calling are not supported by this server"
_NO_GUIDED = "guided decoding is not supported by this server"
#: Fields that change the answer in OpenAI's API (or vLLM's extensions) and that this server
#: cannot honour: ``(name, accepted(value), why)``. A value the test accepts (absent, null,
#: or the neutral value) goes through; any other is a 400 naming the field.
REFUSED_FIELDS: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("logprobs", lambda v: v is None or v is False, _NO_LOGPROBS),
    ("top_logprobs", lambda v: v is None, _NO_LOGPROBS),
    ("prompt_logprobs", lambda v: v is None, _NO_LOGPROBS),
    ("response_format", lambda v: v is None or v == {"type": "text"},
     'only {"type": "text"} is supported; JSON mode and structured outputs are not'),
    ("tools", lambda v: not v, _NO_TOOLS),
    ("tool_choice", lambda v: v is None or v == "none", _NO_TOOLS + '; only "none" is accepted'),
    ("functions", lambda v: not v, _NO_TOOLS),
    ("function_call", lambda v: v is None or v == "none", _NO_TOOLS + '; only "none" is accepted'),
    ("presence_penalty", _zero, "penalties are not supported by the engines; only 0 is accepted"),
    ("frequency_penalty", _zero, "penalties are not supported by the engines; only 0 is accepted"),
    ("repetition_penalty", lambda v: v is None or v == 1,
     "penalties are not supported by the engines; only 1 is accepted"),
    ("logit_bias", lambda v: not v, "logit_bias is not supported by the engines"),
    ("min_p", _zero, "min_p is not supported by the engines; only 0 is accepted"),
    ("min_tokens", _zero, "min_tokens is not supported by the engines; only 0 is accepted"),
    ("best_of", lambda v: v is None or v == 1, "only best_of=1 is supported"),
    ("use_beam_search", lambda v: not v, "beam search is not supported by the engines"),
    ("guided_json", lambda v: v is None, _NO_GUIDED),
    ("guided_regex", lambda v: v is None, _NO_GUIDED),
    ("guided_choice", lambda v: v is None, _NO_GUIDED),
    ("guided_grammar", lambda v: v is None, _NO_GUIDED),
    ("structured_outputs", lambda v: v is None, _NO_GUIDED),
    ("modalities", lambda v: v is None or v == ["text"], 'only text output is supported (modalities ["text"])'),
    ("audio", lambda v: v is None, "audio output is not supported by this server"),
)


def refuse_unsupported(body: dict[str, Any]) -> None:
    """Refuse a request that asks for something this server would otherwise silently not do.

    Args:
        body: The decoded request body.

    Raises:
        APIError: 400 naming the first field of :data:`REFUSED_FIELDS` with a value other
            than its neutral one.
    """
    for name, accepted, why in REFUSED_FIELDS:
        if name in body and not accepted(body[name]):
            value = body[name]
            shown = f"{name}={json.dumps(value)}" if isinstance(value, bool | int | float | str) else name
            raise bad_request(f"{shown}: {why}", name, "unsupported_parameter")


def validation_failure(errors: list[Any]) -> APIError:
    """The 400 for a body that does not fit the request model, naming the first field at fault.

    Args:
        errors: pydantic's ``errors()`` (of a :class:`pydantic.ValidationError`, or of FastAPI's
            ``RequestValidationError``).

    Returns:
        The error to answer with.
    """
    first = (errors or [{}])[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or None
    return bad_request(f"{where}: {first.get('msg', 'invalid request')}", where)


def read_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """The request a decoded body asks for: refused fields first, then the fields this server reads.

    Args:
        body: The decoded request body (:func:`openai_frontend.body.decode_body`).

    Returns:
        The validated request.

    Raises:
        APIError: 400 naming the field (:func:`refuse_unsupported`, :func:`validation_failure`).
    """
    refuse_unsupported(body)
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        raise validation_failure(err.errors()) from None


def sampling_of(req: ChatCompletionRequest, max_output_len: int) -> Sampling:
    """The ensembles' sampling inputs for a request, checked.

    OpenAI's defaults differ from the engine's in one place: a ``temperature`` above 0
    with neither ``top_p`` nor ``top_k`` means plain sampling for OpenAI but greedy for
    TensorRT-LLM's contract (both at 0), so ``top_p`` 1.0 is sent with it. With no
    ``temperature`` at all the server's default (greedy) applies.

    Args:
        req: The request.
        max_output_len: The model's largest ``max_tokens`` (``llm.max_output_len``), also the
            default when the request gives none.

    Returns:
        The sampling inputs.

    Raises:
        APIError: ``n`` other than 1, ``max_tokens`` outside ``1..max_output_len``,
            ``temperature`` outside 0..2, ``top_p`` outside (0, 1], ``top_k`` other than -1
            or outside 0..2**31-1, a seed outside 0..2**64-1.
    """
    if req.n is not None and req.n != 1:
        raise bad_request(f"n={req.n}: this server returns one choice per request; only n=1 is supported", "n")
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is None:
        max_tokens = max_output_len
    if max_tokens < 1:
        raise bad_request(f"{name}={max_tokens}: must be at least 1", name)
    if max_tokens > max_output_len:
        raise bad_request(f"{name}={max_tokens}: over this model's limit of {max_output_len} tokens", name)
    if req.seed is not None and not 0 <= req.seed <= _MAX_SEED:
        raise bad_request(f"seed={req.seed}: must be within 0..{_MAX_SEED}", "seed")
    low, high = _TEMPERATURE_RANGE
    if req.temperature is not None and not low <= req.temperature <= high:
        raise bad_request(f"temperature={req.temperature}: must be within {low:g}..{high:g}", "temperature")
    if req.top_p is not None and not 0 < req.top_p <= 1:
        raise bad_request(f"top_p={req.top_p}: must be within (0, 1]", "top_p")
    if req.top_k is not None and req.top_k != -1 and not 0 <= req.top_k <= _MAX_TOP_K:
        raise bad_request(f"top_k={req.top_k}: must be -1 (off) or within 0..{_MAX_TOP_K}", "top_k")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    top_k = None if req.top_k in (None, -1) else req.top_k  # -1: "no top-k" in vLLM's dialect
    top_p = req.top_p
    if req.temperature is not None and req.temperature > 0 and top_p is None and top_k is None:
        top_p = 1.0
    return Sampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_k=top_k,
        top_p=top_p,
        seed=req.seed,
        stop_words=tuple(s for s in stops if s),
        ignore_eos=bool(req.ignore_eos),
    )


def check_prompt_bytes(text_bytes: int, config: FrontendConfig) -> None:
    """Refuse a prompt whose system and user text alone cannot fit the engine.

    ``text_bytes`` bytes are at least ``ceil(text_bytes / L)`` tokens (``L`` =
    :attr:`FrontendConfig.token_bytes`), so a text over ``max_input_len * L`` bytes is over
    ``max_input_len`` tokens whatever the tokenizer makes of it: refusing it here can never
    refuse a prompt that fits, and saves Triton from tokenizing megabytes first.

    Args:
        text_bytes: :func:`openai_frontend.media.prompt_text_bytes` of the request's messages.
        config: The front door's limits.

    Raises:
        APIError: 400 naming ``messages`` and the limit.
    """
    limit = config.max_text_bytes
    if limit is None or text_bytes <= limit:
        return
    least = -(-text_bytes // (config.token_bytes or 1))
    raise bad_request(
        f"messages: the system and user text is {text_bytes} bytes, so at least {least} tokens "
        f"(this tokenizer's tokens stand for at most {config.token_bytes} bytes each), over this model's "
        f"limit of {config.max_input_len} input tokens",
        "messages",
        "prompt_too_long",
    )
