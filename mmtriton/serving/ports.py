"""Ports for servers started together: distinct, held by lock files until the server stops.

:func:`reserve_ports` binds candidate sockets until every port is chosen (so the kernel
cannot hand out one port twice) and takes a lock file per port in :func:`port_lock_dir`,
so no other caller on this machine, in this process or another, gets it meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


class ServerError(RuntimeError):
    """The server did not start, died, or did not become ready in time."""


class PortInUseError(ServerError):
    """The server exited because a port it was given is taken.

    Attributes:
        port: The port Triton named, or None when the log did not say which.
    """

    def __init__(self, message: str, port: int | None) -> None:
        super().__init__(message)
        self.port = port


def port_lock_dir() -> Path:
    """Folder of the per-port lock files (``$MMTRITON_PORT_LOCK_DIR`` or ``<tmp>/mmtriton-ports``)."""
    return Path(os.environ.get("MMTRITON_PORT_LOCK_DIR") or Path(tempfile.gettempdir()) / "mmtriton-ports")


def _lock_port(port: int) -> int | None:
    """Take the lock file of ``port``; its descriptor, or None when another holder has it."""
    folder = port_lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{port}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A releasing holder unlinks the file under its lock: a lock on an unlinked inode protects nothing.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    return fd


@dataclass
class PortReservation:
    """Distinct ports held for one server by lock files until :meth:`release`.

    Attributes:
        ports: The ports, all different.
    """

    ports: list[int]
    _fds: dict[int, int] = field(default_factory=dict, repr=False)

    def release(self) -> None:
        """Give the ports back (idempotent)."""
        for port, fd in list(self._fds.items()):
            with contextlib.suppress(OSError):
                os.unlink(port_lock_dir() / f"{port}.lock")
            os.close(fd)
            del self._fds[port]


def reserve_ports(count: int = 3, exclude: Iterable[int] = (), max_tries: int = 200) -> PortReservation:
    """Choose ``count`` distinct TCP ports free on every interface, and hold them.

    All candidate sockets stay bound until every port is chosen, so the kernel
    cannot hand out one port twice; each chosen port is also locked by a file
    in :func:`port_lock_dir`, so no other caller on this machine (this process
    or another) gets it before the reservation is released.

    Args:
        count: How many ports.
        exclude: Ports never to return (e.g. ones the caller gave explicitly).
        max_tries: Sockets to try before giving up.

    Returns:
        The reservation; call :meth:`PortReservation.release` when the server stops.

    Raises:
        ServerError: Not enough free, unlocked ports were found.
    """
    excluded = set(exclude)
    reservation = PortReservation(ports=[])
    sockets: list[socket.socket] = []
    try:
        for _ in range(max_tries):
            if len(reservation.ports) == count:
                break
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("", 0))
            port = int(sock.getsockname()[1])
            if port in excluded or port in reservation.ports:
                continue
            fd = _lock_port(port)
            if fd is None:
                continue
            reservation.ports.append(port)
            reservation._fds[port] = fd
    except BaseException:
        reservation.release()
        raise
    finally:
        for sock in sockets:
            sock.close()
    if len(reservation.ports) < count:
        reservation.release()
        raise ServerError(f"found only {len(reservation.ports)} of {count} free ports after {max_tries} tries")
    return reservation
