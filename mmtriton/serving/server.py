"""Start and stop the real ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel.

The wheel carries Triton 2.51 (``pytriton/tritonserver/bin/tritonserver``), the
python backend library and one python backend stub per Python version. This
module assembles a backend directory from those pieces, starts the server on
free ports with its own log file, waits for ``/v2/health/ready`` while checking
that the process is alive, and stops the server by its own pid.

Ports left at 0 are chosen by :func:`reserve_ports`: three distinct ports,
each held by a lock file until the server stops, so servers started at the
same time on one machine (in one process or several) never get the same one.
Another program can still take a port between its choice and the server's
bind; the server then exits with "already in use" in its log, and
:meth:`TritonServer.start` picks new ports and tries again (auto-picked ports
only: a port the caller gave is reported by number). Every server gets its
own python backend shared-memory prefix, so :meth:`TritonServer.leftover_shm`
and :meth:`TritonServer.leftover_processes` can show what a stop left behind.

Run ``python -m mmtriton.server --model-repository build/repo-cpu`` to serve a
rendered repository in the foreground (``make serve`` does this).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from mmtriton.serving.ports import PortInUseError, PortReservation, ServerError, reserve_ports

LOGGER = logging.getLogger(__name__)

#: Where the python backend keeps its shared-memory regions.
SHM_DIR = Path("/dev/shm")
#: The ``--backend-config`` key that names the python backend's region prefix (python_backend README,
#: "Running Multiple Instances of Triton Server").
SHM_PREFIX_OPTION = "shm-region-prefix-name"
_SHM_PREFIX_ARG = re.compile(r"(?:^|,)" + re.escape(SHM_PREFIX_OPTION) + r"=([^,\s]+)")
#: How Triton 2.51 says a port is taken (HTTP/metrics: its own check; gRPC: the same after grpc's bind error),
#: and that HTTP and gRPC were given one port.
_PORT_IN_USE = re.compile(r"Socket '[^']*:(\d+)' already in use")
_SAME_PORT = re.compile(r"cannot listen to HTTP requests and GRPC requests at the same address and port \S*:(\d+)")
_BIND_FAILED = re.compile(r"Address already in use|already in use")
PORT_NAMES = ("http_port", "grpc_port", "metrics_port")


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


def shm_prefix_in(args: Iterable[str]) -> list[str]:
    """Python backend shared-memory prefixes named in ``--backend-config`` arguments."""
    return [m.group(1) for arg in args if "python," in arg for m in _SHM_PREFIX_ARG.finditer(arg)]


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) pids whose session id is ``sid``, from ``/proc/<pid>/stat``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...; comm may hold spaces and parentheses.
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return sorted(pids)


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
        http_port, grpc_port, metrics_port: Ports; 0 picks a free one (see :func:`reserve_ports`),
            and a start that loses such a port to another program is retried with new ones.
        ready_timeout_s: How long to wait for ``/v2/health/ready``.
        exit_timeout_s: Passed as ``--exit-timeout-secs``; the stop waits this plus a margin.
        extra_args: More ``tritonserver`` arguments. A ``--backend-config=python,shm-region-prefix-name=...``
            here replaces the instance's own prefix.
        pythonpath: Folders the python backend models import from (the project root).
        start_attempts: Starts tried when auto-picked ports turn out to be taken.
        shm_prefix: The python backend's shared-memory region prefix; unique per instance
            unless ``extra_args`` names one.
        attempts: Starts the last :meth:`start` needed.
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
    start_attempts: int = 4
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    shm_prefix: str = field(default="", init=False)
    attempts: int = field(default=0, init=False)
    _reservation: PortReservation | None = field(default=None, init=False, repr=False)
    _last_pid: int | None = field(default=None, init=False, repr=False)
    _picked: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _started_command: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        given = shm_prefix_in(self.extra_args)
        self.shm_prefix = given[0] if given else f"mmtriton_{os.getpid()}_{uuid.uuid4().hex[:12]}_"

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
        own_prefix = [f"--backend-config=python,{SHM_PREFIX_OPTION}={self.shm_prefix}"]
        if shm_prefix_in(self.extra_args):
            own_prefix = []
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
            # Its own shared-memory names: two servers on one machine never share a region.
            *own_prefix,
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Start the server and block until it is ready.

        Ports left at 0 are reserved here; if the server exits because one of
        them was taken in the meantime, they are replaced and the start is
        tried again, up to ``start_attempts`` times. A port the caller gave is
        never replaced.

        Raises:
            ServerError: The process exited or was not ready before the deadline;
                the message ends with the tail of the server log.
            PortInUseError: A port given by the caller is taken (the message names
                it), or auto-picked ports were taken on every attempt.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # 0, or a port an earlier start of this instance picked itself: picked (and reserved) afresh.
        auto = [name for name in PORT_NAMES if getattr(self, name) in (0, self._picked.get(name))]
        given = {name: getattr(self, name) for name in PORT_NAMES if name not in auto}
        if len(set(given.values())) < len(given):
            raise ServerError(f"the ports given must differ: {', '.join(f'{k}={v}' for k, v in given.items())}")
        self.attempts = 0
        for attempt in range(1, max(1, self.start_attempts) + 1):
            self.attempts = attempt
            if auto:
                self._reservation = reserve_ports(len(auto), exclude=given.values())
                for name, port in zip(auto, self._reservation.ports):
                    setattr(self, name, port)
                    self._picked[name] = port
            try:
                return self._start_once()
            except PortInUseError as err:
                ports = {name: getattr(self, name) for name in PORT_NAMES}
                self._forget_auto_ports(auto)
                taken = [name for name, port in ports.items() if port == err.port]
                retry = bool(auto) and (set(taken) <= set(auto) if taken else len(auto) == len(PORT_NAMES))
                if not retry:
                    roles = ", ".join(n.removesuffix("_port") for n in taken)
                    what = f"port {err.port} ({roles})" if taken else "a port"
                    raise PortInUseError(
                        f"tritonserver cannot listen on {what}: it is already in use by another program; "
                        f"free it or choose another port ({', '.join(f'{k}={v}' for k, v in ports.items())}); "
                        f"log {self.log_path}:\n{self.log_tail(20)}",
                        err.port,
                    ) from None
                if attempt == max(1, self.start_attempts):
                    raise PortInUseError(
                        f"tritonserver found an auto-picked port taken by another program on each of "
                        f"{attempt} attempts (last: {err.port}); log {self.log_path}:\n{self.log_tail(20)}",
                        err.port,
                    ) from None
                LOGGER.warning(
                    "port %s was taken before tritonserver could bind it (attempt %d of %d); retrying with new ports",
                    err.port,
                    attempt,
                    self.start_attempts,
                )
            except BaseException:
                self._forget_auto_ports(auto)
                raise
        raise AssertionError("unreachable")

    def _forget_auto_ports(self, auto: list[str]) -> None:
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None
        for name in auto:
            setattr(self, name, 0)

    def _start_once(self) -> TritonServer:
        cmd = self.command()
        LOGGER.info("starting %s", " ".join(cmd))
        self._started_command = cmd
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        self._last_pid = self.process.pid
        try:
            self._wait_ready()
        except BaseException:
            # A server that exits while starting (a port taken) does not unload its models: the regions
            # its stubs used stay in /dev/shm. They are this start's own (its prefix), so they go, named.
            self._stop_process(remove_shm=True)
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
        return self._answers(f"http://{self.http_url}/v2/health/ready")

    @staticmethod
    def _answers(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def _port_conflict(self, exited: bool = True) -> PortInUseError | None:
        """The port-in-use failure the log reports, if any (a bare "already in use" only once it exited)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for pattern in (_PORT_IN_USE, _SAME_PORT):
            found = pattern.search(text)
            if found:
                return PortInUseError(found.group(0), int(found.group(1)))
        if exited and _BIND_FAILED.search(text):
            return PortInUseError("a port is already in use", None)
        return None

    def _wait_ready(self) -> None:
        assert self.process is not None
        metrics = "--allow-metrics=false" not in self._started_command
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                conflict = self._port_conflict()
                if conflict is not None:
                    raise conflict
                raise ServerError(
                    f"tritonserver exited with code {code} before it was ready; log {self.log_path}:\n{self.log_tail()}"
                )
            # HTTP answers a moment before the metrics service binds (and may fail to): wait for both,
            # then make sure the process did not exit on a port conflict meanwhile.
            ready = self.is_ready() and (not metrics or self._answers(self.metrics_url))
            if ready and self.process.poll() is None and self._port_conflict(exited=False) is None:
                return
            time.sleep(0.25)
        raise ServerError(
            f"tritonserver was not ready within {self.ready_timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def shm_prefixes(self) -> list[str]:
        """The python backend shared-memory prefixes of the last command started (else the own one)."""
        return shm_prefix_in(self._started_command) or [self.shm_prefix]

    def leftover_shm(self) -> list[Path]:
        """Entries of ``/dev/shm`` whose names start with this server's prefix(es).

        While the server runs these are its live regions; after :meth:`stop`,
        anything listed is a leak (nothing here deletes them).
        """
        if not SHM_DIR.is_dir():
            return []
        prefixes = tuple(self.shm_prefixes())
        return sorted(p for p in SHM_DIR.iterdir() if p.name.startswith(prefixes))

    def leftover_processes(self) -> list[int]:
        """Live pids in the server's session (the server, its stubs); empty after a clean stop."""
        return [] if self._last_pid is None else session_processes(self._last_pid)

    def models_left_live(self) -> list[str]:
        """Models the last run loaded and did not unload, read from its log (empty after a clean stop).

        Triton logs ``successfully loaded 'm'`` and ``successfully unloaded 'm'``; a model
        still live when the exit timeout expires is never unloaded, and Triton then logs
        ``failed to stop server`` and exits 1.
        """
        if not self.log_path.exists():
            return []
        log = self.log_path.read_text(errors="replace")
        loaded = re.findall(r"successfully loaded '([^']+)'", log)
        unloaded = set(re.findall(r"successfully unloaded '([^']+)'", log))
        return sorted(set(loaded) - unloaded)

    def stop_failure(self) -> str | None:
        """Why the last stop was not clean, in words, or None when every model unloaded in time."""
        if not self.log_path.exists():
            return None
        failed = "failed to stop server" in self.log_path.read_text(errors="replace")
        live = self.models_left_live()
        if not failed and not live:
            return None
        return (
            f"tritonserver did not stop cleanly: model(s) {', '.join(live) or '(unknown)'} were still live when "
            f"the exit timeout of {self.exit_timeout_s} s expired. Triton 2.51 keeps a model live while a "
            "client's gRPC stream that used it stays open, and closes gRPC connections only after every model "
            "has unloaded: clients should end their streams after their requests (tritonclient: stop_stream())"
        )

    def stop(self) -> int | None:
        """Stop the server by its own pid: SIGTERM, then SIGKILL after the exit timeout.

        Processes of its session still alive afterwards are killed through its
        process group and named in a warning; shared-memory regions left with
        its prefix are named in a warning but not deleted (see :meth:`leftover_shm`).

        Returns:
            The exit code, or None if it was never started.
        """
        code = self._stop_process()
        if self._reservation is not None:
            self._reservation.release()
            self._reservation = None
        return code

    def _stop_process(self, remove_shm: bool = False) -> int | None:
        proc = self.process
        if proc is None:
            return None
        # A server that died by itself (a crash), or whose stop needed SIGKILL for it or its stubs,
        # leaves its stubs' regions behind; they carry this instance's own prefix, so once its
        # session is gone nobody else can be using them. After a clean stop they are left for
        # leftover_shm() to report: there they would be a leak.
        crashed = proc.poll() is not None
        if not crashed:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=self.exit_timeout_s + 10)
            except subprocess.TimeoutExpired:
                LOGGER.warning("tritonserver pid %d did not exit in time; killing it", proc.pid)
                proc.kill()
                proc.wait(timeout=10)
        # The stubs are children of the server in its own session: make sure none outlives it.
        stragglers = session_processes(proc.pid)
        if stragglers:
            LOGGER.warning("tritonserver pid %d left processes %s; killing its process group", proc.pid, stragglers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while session_processes(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.process = None
        unclean = crashed or bool(stragglers) or proc.returncode != 0
        leaked = self.leftover_shm()
        if leaked and (remove_shm or unclean):
            for path in leaked:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            LOGGER.warning(
                "removed %d shared-memory region(s) tritonserver pid %d left after %s: %s",
                len(leaked),
                proc.pid,
                "a failed start" if remove_shm else
                f"it {'exited by itself' if crashed else 'was stopped'} with code {proc.returncode}"
                + (" and its stubs had to be killed" if stragglers else ""),
                " ".join(str(p) for p in leaked),
            )
        elif leaked:
            LOGGER.warning(
                "tritonserver pid %d left %d shared-memory region(s): %s",
                proc.pid,
                len(leaked),
                " ".join(str(p) for p in leaked),
            )
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
        code = server.stop()
    failure = server.stop_failure()
    if failure or code not in (0, None):
        LOGGER.error("%s (exit code %s)", failure or f"{what} exited with code {code} when stopped", code)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
