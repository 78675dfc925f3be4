"""Writing model text to a terminal without letting it reconfigure the terminal.

A model's text is data, not terminal commands: the tiny bundle's random
weights produce control characters and escape sequences (``ESC [ 2 J``, BEL,
carriage returns), and a real model can too. :func:`printable` keeps every
printable character, newlines and tabs, and shows any other control character
as a visible escape (``\\x1b``, ``\\x07``, ``\\u202e``), so nothing the server
sends is ever interpreted by the terminal. The escaping is per character, so a
sequence split across two streamed chunks is escaped all the same.

Example::

    out = TextOutput(sys.stdout)
    for chunk in client.stream("Hello"):
        out.write(chunk.text)
    out.end_line()
"""

from __future__ import annotations

import unicodedata
from typing import TextIO

# Kept as they are: the text's own line breaks and tabs.
_KEPT = frozenset("\n\t")
# Unicode categories never written raw: controls (C0, DEL, C1 such as the 8-bit CSI U+009B),
# lone surrogates (they cannot be encoded) and the line/paragraph separators.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})
# Bidirectional embeddings, overrides and isolates: they reorder what is shown after them.
_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x200E, 0x200F, 0x061C))


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on shown as a visible escape.

    Printable characters (any script, emoji included), newlines and tabs are kept;
    C0/C1 control characters (ESC, BEL, CR, backspace, DEL, U+009B ...), lone
    surrogates, line/paragraph separators and bidirectional controls become
    ``\\xNN`` / ``\\uNNNN`` escapes.

    Args:
        text: Text from the server.

    Returns:
        The text, safe to write to a terminal.
    """
    if text.isprintable() and not any(c in _BIDI_CONTROLS for c in text):
        return text  # the common case: nothing to escape
    return "".join(
        _escape(c) if c not in _KEPT and (unicodedata.category(c) in _ESCAPED_CATEGORIES or c in _BIDI_CONTROLS) else c
        for c in text
    )


class TextOutput:
    """Writes streamed model text to a stream, escaped by :func:`printable`.

    It also encodes what the stream's encoding cannot hold as backslash escapes
    (an ASCII-only terminal gets ``\\u00e9`` instead of an exception), and
    remembers whether the last text ended a line, so a message written after it
    starts on a line of its own.

    Args:
        stream: A text stream, e.g. ``sys.stdout``.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.mid_line = False

    def write(self, text: str) -> None:
        """Write one piece of model text, escaped, and flush it."""
        if not text:
            return
        safe = printable(text)
        encoding = getattr(self.stream, "encoding", None) or "utf-8"
        safe = safe.encode(encoding, "backslashreplace").decode(encoding)
        self.stream.write(safe)
        self.stream.flush()
        self.mid_line = not safe.endswith("\n")

    def end_line(self) -> None:
        """End the current line if text was written since the last newline."""
        if self.mid_line:
            self.stream.write("\n")
            self.stream.flush()
            self.mid_line = False
