"""Start and stop the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 (``pytriton/tritonserver/bin/tritonserver``), the
python backend library and one python backend stub per Python version. This
module assembles a backend directory from those pieces, starts the server on
free ports with its own log file, waits for ``/v2/health/ready`` while checking
that the process is alive, and stops the server by its own pid.

Run ``python -m mmtriton.server --model-repository build/repo-cpu`` to serve a
rendered repository in the foreground (``make serve`` does this).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

LOGGER = logging.getLogger(__name__)


class ServerError(RuntimeError):
    """The server did not start, died, or did not become ready in time."""


def _pytriton_root() -> Path:
    # Located, not imported: importing pytriton pulls its client's dependencies (gevent).
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("the nvidia-pytriton wheel (Triton server binary) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def tritonserver_binary() -> Path:
    """Return the path of the ``tritonserver`` binary inside the pytriton wheel."""
    return _pytriton_root() / "tritonserver" / "bin" / "tritonserver"


def server_library_dir() -> Path:
    """Return the folder of shared libraries the wheel's server links against."""
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def prepare_backend_dir(dest: Path) -> Path:
    """Assemble a Triton backend directory with the python backend for this Python.

    Triton looks for ``<backend-directory>/python/libtriton_python.so`` and the
    stub next to it; the wheel keeps one stub per Python version, so the one
    matching the interpreter that runs the models is copied in.

    Args:
        dest: Folder to create (``<dest>/python/...``). Reused if complete.

    Returns:
        The backend directory to pass as ``--backend-directory``.
    """
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise ServerError(f"nvidia-pytriton has no python backend stub for Python {version} ({stub})")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (root / "backends" / "python").iterdir():
        if not src.is_file():
            continue
        target = python_dir / src.name
        if not target.exists():
            shutil.copy2(src, target)
    if not (python_dir / stub.name).exists():
        shutil.copy2(stub, python_dir / stub.name)
    return dest


def free_port() -> int:
    """Return a TCP port that was free a moment ago on localhost."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(extra_pythonpath: list[Path] | None = None) -> dict[str, str]:
    """Environment for the server and its python backend stubs.

    The stub embeds ``libpython`` and finds its packages through ``python3`` on
    ``PATH``, so this interpreter's ``bin`` goes first; the wheel's bundled
    libraries and this interpreter's ``libpython`` go on ``LD_LIBRARY_PATH``.
    """
    env = os.environ.copy()
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    libdirs = [str(server_library_dir())]
    libpython = sysconfig.get_config_var("LIBDIR")
    if libpython:
        libdirs.append(libpython)
    if env.get("LD_LIBRARY_PATH"):
        libdirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = ":".join(libdirs)
    paths = [str(p) for p in (extra_pythonpath or [])]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = ":".join(paths)
    return env


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving one model repository.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Attributes:
        model_repository: Rendered model repository to serve.
        work_dir: Folder for the backend directory and the log file.
        http_port, grpc_port, metrics_port: Ports; 0 picks a free one.
        ready_timeout_s: How long to wait for ``/v2/health/ready``.
        exit_timeout_s: Passed as ``--exit-timeout-secs``; the stop waits this plus a margin.
        extra_args: More ``tritonserver`` arguments.
        pythonpath: Folders the python backend models import from (the project root).
    """

    model_repository: Path
    work_dir: Path
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    ready_timeout_s: float = 180.0
    exit_timeout_s: int = 5
    extra_args: list[str] = field(default_factory=list)
    pythonpath: list[Path] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def log_path(self) -> Path:
        """The server's own log file (stdout and stderr)."""
        return self.work_dir / "tritonserver.log"

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """URL of the Prometheus metrics endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        """The full ``tritonserver`` command line."""
        backend_dir = prepare_backend_dir(self.work_dir / "backends")
        return [
            str(tritonserver_binary()),
            f"--model-repository={Path(self.model_repository).resolve()}",
            f"--backend-directory={backend_dir.resolve()}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--allow-metrics=true",
            # Every config is rendered in full; the server must not fill gaps silently.
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-info=true",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Start the server and block until it is ready.

        Raises:
            ServerError: The process exited or was not ready before the deadline;
                the message ends with the tail of the server log.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port()
        self.grpc_port = self.grpc_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        cmd = self.command()
        LOGGER.info("starting %s", " ".join(cmd))
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        LOGGER.info("%s pid %d ready: http %s grpc %s", cmd[0], self.process.pid, self.http_url, self.grpc_url)
        return self

    def environment(self) -> dict[str, str]:
        """The environment the process starts with (subclasses add to it)."""
        return server_env(self.pythonpath)

    def log_tail(self, lines: int = 80) -> str:
        """The last lines of the server log."""
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def is_ready(self) -> bool:
        """True when ``/v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver was not ready within {self.ready_timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> int | None:
        """Stop the server by its own pid: SIGTERM, then SIGKILL after the exit timeout.

        Returns:
            The exit code, or None if it was never started.
        """
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                LOGGER.warning("tritonserver pid %d did not exit in time; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        # The stubs are children of the server in its own session: make sure none outlives it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.process = None
        return proc.returncode

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve a model repository in the foreground until Ctrl-C."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, default=Path("build/server"))
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    project_root = Path(__file__).resolve().parent.parent
    server = TritonServer(
        model_repository=args.model_repository,
        work_dir=args.work_dir,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        pythonpath=[project_root],
    )
    try:
        server.start()
    except ServerError as err:
        LOGGER.error("%s", err)
        return 1
    LOGGER.info("serving %s (log: %s); Ctrl-C stops it", args.model_repository, server.log_path)
    return serve_until_stopped(server, "tritonserver")


def serve_until_stopped(server: TritonServer, what: str, poll_s: float = 0.5, tail_lines: int = 80) -> int:
    """Keep a started server running until SIGINT/SIGTERM; stop it by its own pid.

    Args:
        server: A started server (or a subclass such as the TP launcher's).
        what: Name of the process for the log ("tritonserver", "mpirun").
        poll_s: How often the process is checked.
        tail_lines: Log lines shown if it exits on its own.

    Returns:
        0 after a requested stop, 1 if the process exited by itself.
    """
    stop = {"now": False}

    def _request_stop(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    try:
        while not stop["now"]:
            if server.process is None or server.process.poll() is not None:
                code = None if server.process is None else server.process.returncode
                LOGGER.error("%s exited with code %s; log tail:\n%s", what, code, server.log_tail(tail_lines))
                return 1
            time.sleep(poll_s)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
