"""Pieces behind cancellation and liveness that run without a server."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from mmtriton.backend.cancellation import StopForwarder
from mmtriton.serving.probe import tiny_png

ROOT = Path(__file__).resolve().parents[1]


def test_one_stop_per_request_id() -> None:
    sent: list[str] = []
    done = threading.Event()

    def send(request_id: str) -> None:
        sent.append(request_id)
        if len(sent) == 3:
            done.set()

    forwarder = StopForwarder(send)
    queued = [forwarder.cancelled(rid) for rid in ["a", "a", "b", "a", "", "c", "b"]]
    assert done.wait(5)
    forwarder.close()
    assert queued == [True, False, True, False, False, True, False]
    assert sent == ["a", "b", "c"] and forwarder.sent == 3


def test_a_failed_stop_does_not_end_the_forwarder() -> None:
    sent: list[str] = []

    def send(request_id: str) -> None:
        if request_id == "bad":
            raise RuntimeError("tensorrt_llm unreachable")
        sent.append(request_id)

    forwarder = StopForwarder(send)
    forwarder.cancelled("bad")
    forwarder.cancelled("good")
    forwarder.close()
    assert sent == ["good"]


def test_remembered_ids_are_bounded() -> None:
    forwarder = StopForwarder(lambda _rid: None, capacity=4)
    for i in range(10):
        assert forwarder.cancelled(f"r{i}")
    # The oldest ids were forgotten: a late chunk of r0 sends one more (harmless) stop.
    assert forwarder.cancelled("r0")
    assert not forwarder.cancelled("r9")
    forwarder.close()


def test_stub_exits_when_its_parent_is_killed(tmp_path: Path) -> None:
    """A parent process (standing in for tritonserver) starts a child that calls exit_with_parent."""
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        child = os.fork()
        if child == 0:
            from mmtriton.backend.stub_watchdog import exit_with_parent
            exit_with_parent(poll_s=0.1)
            open({str(pid_file)!r}, "w").write(str(os.getpid()))
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 20
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline, "child never started"
            time.sleep(0.05)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, f"child {child} outlived its parent by 5 s"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_probe_image_is_a_valid_png() -> None:
    """The probe's hand-made PNG decodes (PIL) to the gradient it encodes."""
    image = Image.open(io.BytesIO(tiny_png(16)))
    assert image.format == "PNG" and image.size == (16, 16) and image.mode == "RGB"
    pixels = np.asarray(image)
    ramp = np.arange(16) * 255 // 15
    assert (pixels[0, :, 0] == ramp).all() and (pixels[:, 0, 1] == ramp).all() and (pixels[0, :, 2] == ramp[::-1]).all()
