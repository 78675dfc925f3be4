"""Make a python backend stub exit when its ``tritonserver`` is gone.

A stub is a child process of the server. When the server is killed (SIGKILL after
its exit timeout, an OOM kill, a crash), its stubs are re-parented and, in Triton
2.51, can keep running: one was seen holding a 300 MB shared-memory region and
ignoring SIGTERM. Every model calls :func:`exit_with_parent` from ``initialize``;
a daemon thread then ends the stub as soon as its parent changes.
"""

from __future__ import annotations

import logging
import os
import threading

LOGGER = logging.getLogger(__name__)
_started = threading.Event()


def exit_with_parent(poll_s: float = 1.0) -> None:
    """Start (once per process) a thread that exits the process when its parent changes.

    Args:
        poll_s: Seconds between checks of the parent pid.
    """
    if _started.is_set():
        return
    _started.set()
    parent = os.getppid()

    def _watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                LOGGER.error("tritonserver (pid %d) is gone; stub pid %d exits", parent, os.getpid())
                os._exit(1)

    threading.Thread(target=_watch, name="exit-with-parent", daemon=True).start()
