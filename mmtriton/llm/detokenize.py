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
        self._mark = 0  # ids[:_mark] decoded to whole characters when last seen
        self._sent = 0  # characters of decode(ids[_start:]) already sent

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty while a character is pending).

        Only an unfinished last character is held back: when a chunk of several tokens
        ends inside a character, every whole character before it goes out now, so a
        stream that ends there loses at most that unfinished character.
        """
        self._ids.extend(int(i) for i in new_ids)
        # The longest run of tokens whose text ends on a whole character. Trimming the text
        # instead would not do: byte-fallback decoders turn a whole byte group into U+FFFD
        # when it ends inside a character, complete characters before the cut included.
        # A character is at most 4 bytes, so few lengths are ever tried.
        end, text = len(self._ids), ""
        while end > self._start:
            text = self._decode(self._ids[self._start : end])
            if not text.endswith(REPLACEMENT):
                break
            end -= 1
        else:
            text = ""
        if len(text) <= self._sent:
            # Nothing new yet (an unfinished character, a skipped special token, or a
            # SentencePiece "▁" whose space shows only once a word follows): keep the window.
            return ""
        out = text[self._sent :]
        if end == len(self._ids):
            # Slide the window: keep the tokens since the previous whole-character point as
            # context (a SentencePiece word start needs the token before it to keep its space).
            self._start, self._mark = self._mark, len(self._ids)
            self._sent = len(self._decode(self._ids[self._start :]))
        else:
            self._sent = len(text)
        return out

    def flush(self) -> str:
        """Text of tokens still held back (an incomplete character becomes U+FFFD)."""
        out = self._decode(self._ids[self._start :])[self._sent :]
        self._start = self._mark = len(self._ids)
        self._sent = 0
        return out


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
