"""What the command lines share: one-line errors and exit codes, and reading the media files.

A user's mistake never ends in a traceback: a file that cannot be read or a
bad ``--url`` is one argparse-style line (``prog: error: ...``) and exit code
2; a request that failed (no server at the address, an input the server
refused) is one ``error: ...`` line and exit code 1; Ctrl-C is exit code 130.
"""

from __future__ import annotations

import sys
from pathlib import Path

from clients.errors import ClientError, InvalidURLError, ServerUnavailableError
from clients.terminal import printable

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in the command line (a file that cannot be read): exit code 2."""


def read_input(path: Path | None, flag: str) -> bytes | None:
    """The bytes of a media file named on the command line.

    Args:
        path: The file, or None when the option was not given.
        flag: The option's name (``--image``), for the message.

    Returns:
        The file's bytes, or None.

    Raises:
        UsageError: The file does not exist or cannot be read; the message names it.
    """
    if path is None:
        return None
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path}: is a folder, not a file") from None
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot read it: {err.strerror or err}") from None


def one_line(text: str) -> str:
    """``text`` escaped for a terminal (:func:`clients.terminal.printable`) and folded onto one line."""
    return " ".join(printable(text).split())


def usage_error(prog: str, message: str) -> int:
    """Write an argparse-style one-line error (``prog: error: message``) to stderr.

    Args:
        prog: The program name, e.g. ``clients chat``.
        message: What is wrong.

    Returns:
        The exit code for a usage mistake, 2.
    """
    sys.stderr.write(f"{prog}: error: {one_line(message)}\n")
    sys.stderr.flush()
    return EXIT_USAGE


def client_error(err: ClientError, prog: str) -> int:
    """Write a client error as one line to stderr.

    A bad address is a usage mistake (``prog: error: --url: ...``, exit code 2);
    a server that could not be reached at all gets a hint to start one.

    Args:
        err: The error the client library raised.
        prog: The program name, for a usage mistake.

    Returns:
        The exit code: 2 for a bad address, else 1.
    """
    if isinstance(err, InvalidURLError):
        return usage_error(prog, f"--url: {err}")
    message = one_line(str(err))
    if isinstance(err, ServerUnavailableError) and not err.connected:
        message += "; is `make serve` running?"
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return EXIT_FAILED


def interrupted() -> int:
    """Write a line for Ctrl-C and return its exit code, 130."""
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    return EXIT_INTERRUPTED
