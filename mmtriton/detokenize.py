"""Incremental detokenization for streaming (the ``postprocessing`` model's logic).

Decoding each streamed chunk on its own breaks in two ways: a multi-byte UTF-8
character split across tokens turns into replacement characters, and
tokenizers that mark word starts (SentencePiece's ``▁``) drop the space
before a chunk's first word. :class:`IncrementalDetokenizer` decodes a short
window of earlier tokens together with the new ones, emits only the text past
what the window already produced, and holds tokens back while the text ends
in an incomplete character.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces that never split a character.

    Args:
        tokenizer: A Hugging Face tokenizer.
        skip_special_tokens: Leave special tokens (``<|end|>``...) out of the text.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._start = 0  # first id of the context window
        self._emitted = 0  # ids[:_emitted] are fully represented in the text sent so far

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty while a character is pending)."""
        self._ids.extend(int(i) for i in new_ids)
        before = self._decode(self._ids[self._start : self._emitted])
        after = self._decode(self._ids[self._start :])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""
        self._start = self._emitted
        self._emitted = len(self._ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete character becomes U+FFFD)."""
        before = self._decode(self._ids[self._start : self._emitted])
        after = self._decode(self._ids[self._start :])
        self._start = self._emitted = len(self._ids)
        return after[len(before) :]


class DetokenizerStates:
    """Per-request detokenizers for streamed responses, keyed by Triton request id.

    A streamed answer reaches ``postprocessing`` as one request per chunk, all
    carrying the id of the client's request; the state must outlive a chunk.
    A chunk that opens an answer (``restart``) replaces whatever an earlier
    request with the same id left. The stream's end is not visible there, so the
    map is bounded: the least recently used state is dropped once ``capacity``
    streams are open.
    """

    def __init__(self, tokenizer: Any, capacity: int = 4096) -> None:
        self._tokenizer = tokenizer
        self._capacity = capacity
        self._states: OrderedDict[str, IncrementalDetokenizer] = OrderedDict()
        self._lock = threading.Lock()

    def push(self, request_id: str, new_ids: list[int], *, restart: bool = False) -> str:
        """Text completed by ``new_ids`` in the stream ``request_id``.

        Args:
            request_id: The client's request id (shared by every chunk of one answer).
            new_ids: Tokens of this chunk.
            restart: This chunk opens a new answer: drop any state left under the same id.
        """
        with self._lock:
            state = None if restart else self._states.get(request_id)
            if state is None:
                state = IncrementalDetokenizer(self._tokenizer)
                self._states[request_id] = state
                while len(self._states) > self._capacity:
                    self._states.popitem(last=False)
            else:
                self._states.move_to_end(request_id)
        return state.push(new_ids)

    def __len__(self) -> int:
        return len(self._states)
