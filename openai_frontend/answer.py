"""The answer to a chat completion, assembled from Triton's stream: whole, or as server-sent events.

:meth:`Answer.begin` reads the stream's first response, which decides the status (an
input error before any token is a 400). From there :func:`whole_answer` collects the text
into one ``chat.completion`` (cancelling the stream when the client leaves first) and
:func:`streamed_answer` sends it as ``chat.completion.chunk`` events ending with
``data: [DONE]``; an error after streaming started is one ``data: {"error": ...}`` event.
Either way the text ends before the first stop string (:class:`StopText`), the token
counts and latencies are recorded (:class:`Usage`) and the Triton stream is closed, which
cancels a generation still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
from fastapi.responses import JSONResponse, Response, StreamingResponse

from clients.llm import Chunk, Sampling
from openai_frontend.errors import APIError, bad_request
from openai_frontend.media import ParsedMessages
from openai_frontend.metrics import Metrics
from openai_frontend.triton import TritonError

LOGGER = logging.getLogger(__name__)

#: Request fields that the server's input errors name, by the ensemble input they come from.
_PARAM_OF_INPUT = {
    "text_input": "messages",
    "messages": "messages",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "stop_words": "stop",
}


def from_triton(err: TritonError, parsed: ParsedMessages) -> APIError:
    """A Triton failure as the client sees it: input errors are 400 naming the field, the rest 500.

    Args:
        err: What Triton answered.
        parsed: The request's conversation, which says which part an image or clip came from.

    Returns:
        The error to answer with.
    """
    if not err.invalid_input:
        return APIError(500, f"inference failed: {err.message}", code="inference_failed")
    param = {"image": parsed.image_param, "audio": parsed.audio_param}.get(err.input_name or "")
    param = param or _PARAM_OF_INPUT.get(err.input_name or "", err.input_name)
    return bad_request(f"{param}: {err.message}" if param else err.message, param, "rejected_by_model")


class StopText:
    """OpenAI ``stop`` semantics on streamed text: the answer ends before the first stop string.

    The engine stops on the stop strings' token sequences and keeps them (TensorRT-LLM's
    behaviour); OpenAI clients expect the text to end just before the first occurrence of
    any stop string, also one the tokenizer splits differently in context. Text that could
    still be the start of a stop string (the last ``len(longest stop) - 1`` characters) is
    held back until the next piece shows it is not.

    Args:
        stops: The request's stop strings (empty ones are ignored).
    """

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.hit = False

    def push(self, text: str) -> str:
        """Add a piece of the answer; return what can be sent now (sets :attr:`hit` at a stop string)."""
        if self.hit:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        if len(self.pending) <= self.hold:
            return ""
        cut = len(self.pending) - self.hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        """The held-back tail once the answer has ended without a stop string."""
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class Usage:
    """Token counts and timings of one answer, as the stream goes.

    Args:
        started: ``time.perf_counter()`` when the request arrived (time to first token counts from it).
        metrics: Where the latencies and the token counts go.
    """

    def __init__(self, started: float, metrics: Metrics) -> None:
        self.started = started
        self.metrics = metrics
        self.last: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def add(self, chunk: Chunk) -> None:
        """Count one response: its latency (first token, or between tokens) and the counts it carries.

        Args:
            chunk: A response of the stream.
        """
        now = time.perf_counter()
        if chunk.token_ids:
            if self.last is None:
                self.metrics.ttft.observe(now - self.started)
            else:
                self.metrics.itl.observe((now - self.last) / len(chunk.token_ids))
            self.last = now
        self.prompt_tokens = chunk.num_input_tokens or self.prompt_tokens
        self.completion_tokens = chunk.num_output_tokens or self.completion_tokens

    def body(self) -> dict[str, int]:
        """The response's ``usage`` object."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def finish_reason(self, max_tokens: int) -> str:
        """``length`` when ``max_tokens`` tokens were generated, else ``stop``.

        Args:
            max_tokens: The request's ``max_tokens``.

        Returns:
            The finish reason.
        """
        return "length" if self.completion_tokens >= max_tokens else "stop"

    def record(self) -> None:
        """Add a finished answer's token counts to the metrics."""
        self.metrics.prompt_tokens.inc(self.prompt_tokens)
        self.metrics.completion_tokens.inc(self.completion_tokens)


class _Client(Protocol):
    async def is_disconnected(self) -> bool: ...


async def unless_client_leaves(work: Awaitable[Any], request: _Client, poll_s: float = 0.1) -> bool:
    """Run ``work`` (a coroutine) to its end, unless the HTTP client disconnects first.

    Args:
        work: The coroutine.
        request: The HTTP request (anything with ``is_disconnected()``).
        poll_s: How often the connection is checked.

    Returns:
        True when ``work`` finished; False when the client went away (``work`` is cancelled).

    Raises:
        Exception: What ``work`` raised.
    """
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                task.result()  # its exception, if any
                return True
            if await request.is_disconnected():
                return False
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _sse(payload: dict[str, Any] | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


@dataclass
class Answer:
    """One chat completion being answered, from its Triton stream's first response on.

    It is counted in ``metrics.in_flight`` from :meth:`begin` until :func:`whole_answer` or
    :func:`streamed_answer` has closed the stream.

    Attributes:
        header: ``id``, ``created`` and ``model`` of the response and of every chunk.
        first: The first response, or None when the stream ended without one.
        chunks: The rest of the stream.
        usage: Its token counts and timings.
        sampling: The request's sampling inputs (``max_tokens``, the stop strings).
        parsed: The request's conversation (which part each medium came from).
        metrics: The front door's metrics.
    """

    header: dict[str, Any]
    first: Chunk | None
    chunks: AsyncIterator[Chunk]
    usage: Usage
    sampling: Sampling
    parsed: ParsedMessages
    metrics: Metrics

    @classmethod
    async def begin(
        cls,
        chunks: AsyncIterator[Chunk],
        header: dict[str, Any],
        started: float,
        sampling: Sampling,
        parsed: ParsedMessages,
        metrics: Metrics,
    ) -> Answer:
        """Wait for the stream's first response: an error before any token is the response's status.

        Args:
            chunks: The Triton stream (:meth:`openai_frontend.triton.TritonChat.stream`).
            header: ``id``, ``created`` and ``model`` of the response.
            started: ``time.perf_counter()`` when the request arrived.
            sampling: The request's sampling inputs.
            parsed: The request's conversation.
            metrics: The front door's metrics.

        Returns:
            The answer, counted in flight.

        Raises:
            APIError: What Triton answered first, as the client sees it (:func:`from_triton`),
                or Triton could not be reached (503) or broke the stream (502).
        """
        usage = Usage(started, metrics)
        metrics.in_flight.inc()
        try:
            first = await anext(chunks, None)
        except TritonError as err:
            metrics.in_flight.dec()
            raise from_triton(err, parsed) from None
        except BaseException:
            metrics.in_flight.dec()
            raise
        return cls(header, first, chunks, usage, sampling, parsed, metrics)

    async def pieces(self, stop: StopText) -> AsyncIterator[str]:
        """The answer's text as it streams in: counted in :attr:`usage`, cut at the first stop string
        (``stop``), empty pieces left out, the held-back tail last. At a stop string it stops
        reading; closing :attr:`chunks` then cancels the rest of the generation.

        Args:
            stop: The request's stop strings, fresh for this answer.

        Yields:
            The pieces of text to send.

        Raises:
            TritonError: An error response after the first.
            APIError: Triton could not be reached (503) or broke the stream (502).
        """
        if self.first is not None:
            self.usage.add(self.first)
            if piece := stop.push(self.first.text):
                yield piece
            while not stop.hit:
                chunk = await anext(self.chunks, None)
                if chunk is None:
                    break
                self.usage.add(chunk)
                if piece := stop.push(chunk.text):
                    yield piece
        if piece := stop.flush():
            yield piece

    async def close(self) -> None:
        """Close the Triton stream (which cancels it when it has not finished), even while being cancelled."""
        with anyio.CancelScope(shield=True):
            await self.chunks.aclose()

    def finish_reason(self, stop: StopText) -> str:
        """``stop`` at a stop string, else ``length`` or ``stop`` by the tokens generated.

        Args:
            stop: What :meth:`pieces` was given.

        Returns:
            The finish reason.
        """
        return "stop" if stop.hit else self.usage.finish_reason(self.sampling.max_tokens)


async def whole_answer(answer: Answer, request: _Client) -> Response:
    """The whole answer as one ``chat.completion``; a 499 when the client leaves before it is whole.

    Args:
        answer: The answer, from :meth:`Answer.begin`.
        request: The HTTP request, watched for its client leaving.

    Returns:
        The response.

    Raises:
        APIError: Triton failed after the first response (:func:`from_triton`, or 502/503).
    """
    text: list[str] = []
    stop = StopText(answer.sampling.stop_words)

    async def collect() -> None:
        text.extend([piece async for piece in answer.pieces(stop)])

    try:
        if not await unless_client_leaves(collect(), request):
            # Nobody reads the answer any more: closing the stream (below) frees the engine's slot.
            answer.metrics.cancelled.inc()
            LOGGER.info("client of %s went away before the whole answer; its Triton stream is cancelled", answer.header["id"])
            return Response(status_code=499)
    except TritonError as err:
        raise from_triton(err, answer.parsed) from None
    finally:
        answer.metrics.in_flight.dec()
        await answer.close()
    answer.usage.record()
    return JSONResponse(
        {
            **answer.header,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": None,
                    "finish_reason": answer.finish_reason(stop),
                }
            ],
            "usage": answer.usage.body(),
            "system_fingerprint": None,
        }
    )


def streamed_answer(answer: Answer, include_usage: bool) -> StreamingResponse:
    """The answer as server-sent events (:func:`_events`).

    Args:
        answer: The answer, from :meth:`Answer.begin`.
        include_usage: ``stream_options.include_usage``: a last chunk with empty ``choices``
            carries ``usage``, and every chunk has ``"usage": null``.

    Returns:
        The streaming response.
    """
    return StreamingResponse(
        _events(answer, include_usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(answer: Answer, include_usage: bool) -> AsyncIterator[bytes]:
    base = {**answer.header, "object": "chat.completion.chunk", "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice], **extra})

    ended = False
    stop = StopText(answer.sampling.stop_words)
    try:
        yield event({"role": "assistant", "content": ""})
        async for piece in answer.pieces(stop):
            yield event({"content": piece})
        ended = True
        answer.usage.record()
        yield event({}, answer.finish_reason(stop))
        if include_usage:
            yield _sse({**base, "choices": [], "usage": answer.usage.body()})
        yield _sse("[DONE]")
    except (TritonError, APIError) as err:
        ended = True
        api = from_triton(err, answer.parsed) if isinstance(err, TritonError) else err
        answer.metrics.count_error(api)
        yield _sse(api.body())
        yield _sse("[DONE]")
    finally:
        if not ended:
            answer.metrics.cancelled.inc()
            LOGGER.info("client of %s went away mid-stream; its Triton stream is cancelled", answer.header["id"])
        await answer.close()
        answer.metrics.in_flight.dec()
