"""Shared fixtures: the tiny bundle, a rendered CPU repository and one real Triton server."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mmtriton.spec import ModelSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
SPEC_PATH = ROOT / "build_engines" / "specs" / "tiny.toml"
BUILD = Path(os.environ.get("MMTRITON_BUILD", ROOT / "build"))

_failures: list[str] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        _failures.append(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when a server it started left a shared-memory region behind.

    Every :class:`mmtriton.serving.server.TritonServer` names its python-backend regions
    ``mmtriton_<pid of the process that made it>_...``; the tests make theirs in this process.
    """
    from mmtriton.serving.server import SHM_DIR

    left = sorted(p.name for p in SHM_DIR.glob(f"mmtriton_{os.getpid()}_*")) if SHM_DIR.is_dir() else []
    if left:
        sys.stderr.write(f"\nerror: the tests left {len(left)} shared-memory region(s) in {SHM_DIR}: {' '.join(left)}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def spec() -> ModelSpec:
    return load_spec(SPEC_PATH)


@pytest.fixture(scope="session")
def bundle_dir(spec: ModelSpec) -> Path:
    """The tiny bundle (built once; reused while its spec is unchanged)."""
    from build_engines.bundle import build_bundle

    return build_bundle(spec, BUILD / "bundles" / spec.name)


@pytest.fixture(scope="session")
def tiny_gpu_bundle() -> Path:
    """The tiny-gpu bundle (GPU smoke spec, compose default; built once, reused while its spec is unchanged)."""
    from build_engines.bundle import build_bundle

    spec = load_spec(ROOT / "build_engines" / "specs" / "tiny-gpu.toml")
    return build_bundle(spec, BUILD / "bundles" / spec.name)


@pytest.fixture(scope="session")
def builder(bundle_dir: Path, spec: ModelSpec) -> "PromptBuilder":
    """The preprocessing model's prompt builder for the tiny bundle, in-process."""
    import json

    from mmtriton.llm.prompting import PromptBuilder

    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    return PromptBuilder(
        bundle_dir / "llm",
        vocab_size=bundle["vocab_size"],
        hidden_size=bundle["llm_hidden_size"],
        image_token=spec.tokenizer.image_token,
        audio_token=spec.tokenizer.audio_token,
        max_input_len=spec.llm.max_input_len,
    )


@pytest.fixture(scope="session")
def cpu_repo(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly rendered CPU-profile repository."""
    from build_engines.render import render_repository

    return render_repository(bundle_dir, tmp_path_factory.mktemp("repo") / "repo-cpu", "cpu")


@pytest.fixture(scope="session")
def image_pre(cpu_repo: Path) -> "ImagePreprocessor":
    """The CPU repository's image pipeline, run in-process."""
    from mmtriton.media.preprocess import ImagePreprocessor

    return ImagePreprocessor(cpu_repo / "image_preprocess" / "1" / "dali.py")


@pytest.fixture(scope="session")
def audio_pre(cpu_repo: Path) -> "AudioPreprocessor":
    """The CPU repository's audio pipeline, run in-process."""
    from mmtriton.media.preprocess import AudioPreprocessor

    return AudioPreprocessor(cpu_repo / "audio_preprocess" / "1" / "dali.py")


@pytest.fixture(scope="session")
def server(cpu_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator["TritonServer"]:
    """One real ``tritonserver`` for the whole session, stopped by its own pid.

    If any test failed, the tail of the server log is shown at the end.
    """
    from tests.helpers.servers import make_server

    srv = make_server(cpu_repo, tmp_path_factory.mktemp("server"))
    srv.start()
    try:
        yield srv
    finally:
        alive = srv.process is not None and srv.process.poll() is None
        srv.stop()
        if _failures or not alive:
            sys.stderr.write(f"\n--- tritonserver log ({srv.log_path}) ---\n{srv.log_tail(120)}\n")


@pytest.fixture(scope="session")
def grpc_url(server: "TritonServer") -> str:
    return server.grpc_url


@pytest.fixture(scope="session")
def client(grpc_url: str) -> "ChatClient":
    """The gRPC chat client on the session's server."""
    from clients.llm import ChatClient

    return ChatClient(grpc_url)


@pytest.fixture(scope="session")
def media() -> tuple[bytes, bytes]:
    """A 320x240 JPEG and a 1.5 s 16 kHz WAV."""
    from mmtriton.media.samples import encode_audio, encode_image, synthetic_audio, synthetic_image

    return (
        encode_image(synthetic_image(320, 240, seed=21), "JPEG"),
        encode_audio(synthetic_audio(16000, 1.5, seed=22), 16000, "WAV"),
    )


@pytest.fixture(scope="session")
def cpu_server_metric_names(server: "TritonServer") -> set[str]:
    """Metric names the real CPU server exports on ``/metrics`` (the Grafana dashboard is checked against them)."""
    import urllib.request

    from tests.helpers.deploy import prometheus_metric_names

    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        return prometheus_metric_names(resp.read().decode())


def probe_server(cpu_repo: Path, work_dir: Path) -> "TritonServer":
    """A server of its own (not started) with only what ``mmtriton.serving.probe`` uses loaded.

    For liveness tests that freeze one of its stubs: the python backend aborts the whole
    server when a stopped stub is resumed, so such a server is never shared.
    """

    from tests.helpers.servers import make_server

    return make_server(
        cpu_repo,
        work_dir,
        exit_timeout_s=3,
        extra_args=["--model-control-mode=explicit", "--load-model=embed_image", "--load-model=chat_text"],
    )


def stub_pid(server: "TritonServer", model: str) -> int:
    """Pid of the python backend stub that serves ``model`` on ``server`` (to SIGSTOP it by its own pid)."""
    for pid in server.leftover_processes():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"/{model}/1/model.py" in cmdline:
            return pid
    raise AssertionError(f"no python backend stub for {model}")


