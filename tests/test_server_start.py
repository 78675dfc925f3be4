"""Starting the real ``tritonserver``: distinct ports, retries on a taken port, and nothing left after a stop.

Each server here serves a one-model repository (a python model that echoes its
input), so a start takes about a second; every start is bounded by
``ready_timeout_s`` and every thread by a join timeout. All traffic is on
loopback; the "busy" ports are held by listening sockets of this process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmtriton.serving import server as server_mod
from mmtriton.serving import ports as ports_mod
from mmtriton.serving.ports import PortInUseError, PortReservation, ServerError, reserve_ports
from mmtriton.serving.server import TritonServer
from tests.helpers.servers import make_server

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 60.0

ECHO_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
ECHO_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
            for r in requests
        ]
"""


@pytest.fixture(scope="module")
def echo_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one python model, ``echo`` (FP32 ``X`` -> ``Y``)."""
    repo = tmp_path_factory.mktemp("echo-repo")
    (repo / "echo" / "1").mkdir(parents=True)
    (repo / "echo" / "config.pbtxt").write_text(ECHO_CONFIG)
    (repo / "echo" / "1" / "model.py").write_text(ECHO_MODEL)
    return repo


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port some other program listens on (on every interface, like tritonserver binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def _server(repo: Path, work: Path, **kwargs: object) -> TritonServer:
    return make_server(repo, work, ready_timeout_s=READY_TIMEOUT_S, **kwargs)


def _echo(srv: TritonServer, values: list[float]) -> list[float]:
    body = {"inputs": [{"name": "X", "shape": [len(values)], "datatype": "FP32", "data": values}]}
    request = urllib.request.Request(
        f"http://{srv.http_url}/v2/models/echo/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())["outputs"][0]["data"]


def _ports(srv: TritonServer) -> list[int]:
    return [srv.http_port, srv.grpc_port, srv.metrics_port]


# --- the allocator -------------------------------------------------------------------------------


def test_reserved_ports_are_distinct_over_many_calls() -> None:
    held = [reserve_ports(3) for _ in range(100)]
    try:
        ports = [p for r in held for p in r.ports]
        assert all(len(set(r.ports)) == 3 for r in held)
        assert len(set(ports)) == 300, "a port was handed out twice while reserved"
        # While reserved, another process on this machine gets none of them.
        script = (
            "import json; from mmtriton.serving.ports import reserve_ports; "
            "held = [reserve_ports(3) for _ in range(50)]; "
            "print(json.dumps([p for r in held for p in r.ports])); "
            "[r.release() for r in held]"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True, cwd=ROOT
        )
        theirs = json.loads(out.stdout)
        assert len(theirs) == 150 and not set(theirs) & set(ports)
        assert not any((ports_mod.port_lock_dir() / f"{p}.lock").exists() for p in theirs)
    finally:
        for r in held:
            r.release()
    # Released ports are free again: each one binds on every interface.
    for port in ports[:30]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", port))
    assert not any((ports_mod.port_lock_dir() / f"{p}.lock").exists() for p in ports)


def test_reservation_skips_excluded_and_locked_ports() -> None:
    first = reserve_ports(3)
    try:
        for port in first.ports:
            assert ports_mod._lock_port(port) is None  # held: nobody else may lock it
        again = reserve_ports(3, exclude=first.ports)
        assert not set(again.ports) & set(first.ports)
        again.release()
    finally:
        first.release()
    fd = ports_mod._lock_port(first.ports[0])
    assert fd is not None  # released: lockable again
    PortReservation([first.ports[0]], {first.ports[0]: fd}).release()


# --- starting the real server ---------------------------------------------------------------------


def test_two_servers_started_together_get_distinct_ports(echo_repo: Path, tmp_path: Path) -> None:
    servers = [_server(echo_repo, tmp_path / f"s{i}") for i in range(2)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def start(srv: TritonServer) -> None:
        barrier.wait(timeout=10)
        try:
            srv.start()
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=start, args=(s,)) for s in servers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=2 * READY_TIMEOUT_S)
        assert not any(t.is_alive() for t in threads), "a start did not return"
        assert not errors, errors
        ports = _ports(servers[0]) + _ports(servers[1])
        assert 0 not in ports and len(set(ports)) == 6
        assert servers[0].shm_prefix != servers[1].shm_prefix
        for i, srv in enumerate(servers):
            assert srv.is_ready()
            assert _echo(srv, [float(i), 2.5]) == [float(i), 2.5]
    finally:
        for srv in servers:
            srv.stop()


@pytest.mark.parametrize("taken", ["http_port", "grpc_port", "metrics_port"])
def test_a_taken_auto_port_is_retried(
    taken: str,
    echo_repo: Path,
    tmp_path: Path,
    busy_port: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first reservation hands out a port another program listens on; the start retries with new ones."""
    calls: list[list[int]] = []
    real = server_mod.reserve_ports

    def first_one_collides(count: int = 3, exclude: object = ()) -> PortReservation:
        reservation = real(count, exclude)
        if not calls:
            reservation.ports[server_mod.PORT_NAMES.index(taken)] = busy_port
        calls.append(list(reservation.ports))
        return reservation

    monkeypatch.setattr(server_mod, "reserve_ports", first_one_collides)
    srv = _server(echo_repo, tmp_path / "work")
    with caplog.at_level(logging.WARNING, logger="mmtriton.serving.server"):
        try:
            srv.start()
            assert srv.attempts == 2 and len(calls) == 2
            assert getattr(srv, taken) != busy_port and busy_port not in _ports(srv)
            assert _echo(srv, [1.0]) == [1.0]
        finally:
            srv.stop()
    assert f"port {busy_port} was taken before tritonserver could bind it (attempt 1 of" in caplog.text
    assert srv.leftover_shm() == [] and srv.leftover_processes() == []


def test_auto_ports_taken_on_every_attempt_give_up(
    echo_repo: Path, tmp_path: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = server_mod.reserve_ports

    def always_busy(count: int = 3, exclude: object = ()) -> PortReservation:
        reservation = real(count, exclude)
        reservation.ports[0] = busy_port
        return reservation

    monkeypatch.setattr(server_mod, "reserve_ports", always_busy)
    srv = _server(echo_repo, tmp_path / "work", start_attempts=2)
    with pytest.raises(PortInUseError, match=rf"taken by another program on each of 2 attempts \(last: {busy_port}\)"):
        srv.start()
    assert srv.process is None and srv.leftover_processes() == [] and srv.leftover_shm() == []


@pytest.mark.parametrize("given", ["http_port", "grpc_port", "metrics_port"])
def test_a_given_busy_port_fails_naming_it(
    given: str, echo_repo: Path, tmp_path: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No retry for a port the caller chose: one attempt, and the message says which port and why."""
    calls: list[int] = []
    real = server_mod.reserve_ports

    def counted(count: int = 3, exclude: object = ()) -> PortReservation:
        calls.append(count)
        return real(count, exclude)

    monkeypatch.setattr(server_mod, "reserve_ports", counted)
    srv = _server(echo_repo, tmp_path / "work", **{given: busy_port})
    with pytest.raises(PortInUseError) as err:
        srv.start()
    role = given.removesuffix("_port")
    assert str(err.value).startswith(
        f"tritonserver cannot listen on port {busy_port} ({role}): it is already in use by another program"
    )
    assert err.value.port == busy_port
    assert srv.attempts == 1 and calls == [2]
    assert getattr(srv, given) == busy_port  # the caller's port is kept, never replaced
    assert srv.process is None and srv.leftover_processes() == [] and srv.leftover_shm() == []


def test_given_ports_must_differ(echo_repo: Path, tmp_path: Path) -> None:
    srv = _server(echo_repo, tmp_path / "work", http_port=18000, grpc_port=18000)
    with pytest.raises(ServerError, match="the ports given must differ: http_port=18000, grpc_port=18000"):
        srv.start()
    assert srv.process is None


# --- shared memory and processes ------------------------------------------------------------------


def test_each_server_has_its_own_shm_prefix_unless_given(echo_repo: Path, tmp_path: Path) -> None:
    a, b = _server(echo_repo, tmp_path / "a"), _server(echo_repo, tmp_path / "b")
    assert a.shm_prefix != b.shm_prefix
    assert f"--backend-config=python,shm-region-prefix-name={a.shm_prefix}" in a.command()
    given = _server(echo_repo, tmp_path / "c", extra_args=["--backend-config=python,shm-region-prefix-name=mine_"])
    assert given.shm_prefix == "mine_"
    assert [arg for arg in given.command() if "shm-region-prefix-name" in arg] == [
        "--backend-config=python,shm-region-prefix-name=mine_"
    ]


def test_stop_leaves_no_shm_and_no_processes(
    echo_repo: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    srv = _server(echo_repo, tmp_path / "work")
    srv.start()
    try:
        pid = srv.process.pid if srv.process else -1
        regions = srv.leftover_shm()
        # While it runs, the server's regions carry its prefix (read /dev/shm directly to compare).
        ours = sorted(p for p in Path("/dev/shm").iterdir() if p.name.startswith(srv.shm_prefix))
        assert regions and regions == ours
        live = srv.leftover_processes()
        stubs = [p for p in live if b"triton_python_backend_stub" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert pid in live and len(stubs) == 1
    finally:
        srv.stop()
    assert srv.leftover_shm() == []
    assert srv.leftover_processes() == []
    assert not any(Path(f"/proc/{p}").exists() for p in [pid, *stubs])
    # A region left with the prefix is reported, and stop() does not delete it.
    planted = Path("/dev/shm") / f"{srv.shm_prefix}planted-by-test"
    planted.write_bytes(b"x")
    try:
        assert srv.leftover_shm() == [planted]
        srv.start()  # a restart picks and reserves its ports afresh, as the first start did
        assert srv.attempts == 1 and 0 not in _ports(srv)
        assert all((ports_mod.port_lock_dir() / f"{p}.lock").exists() for p in _ports(srv))
        with caplog.at_level(logging.WARNING, logger="mmtriton.serving.server"):
            srv.stop()
        assert planted.exists() and str(planted) in caplog.text and "left 1 shared-memory region(s)" in caplog.text
    finally:
        planted.unlink(missing_ok=True)


def test_a_crashed_server_leaves_no_shared_memory(cpu_repo: Path, tmp_path: Path) -> None:
    """A tritonserver that dies by itself (here SIGSEGV, as Triton 2.51 does on some hostile input)
    leaves its stubs' regions in /dev/shm; they carry the instance's own prefix, so the stop removes
    them once the server's session is gone, and reports the crash's exit code."""
    import signal

    from tests.conftest import probe_server

    srv = probe_server(cpu_repo, tmp_path)
    srv.start()
    try:
        assert srv.leftover_shm(), "a running server has regions"
        os.kill(srv.process.pid, signal.SIGSEGV)
        srv.process.wait(timeout=30)
    finally:
        code = srv.stop()
    assert code == -signal.SIGSEGV
    assert not srv.leftover_processes()
    assert not srv.leftover_shm()
