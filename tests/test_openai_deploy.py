"""The OpenAI front door's deployment, checked without Docker: image, pins, compose services, scrape.

- ``Dockerfile.openai`` starts from ``stack.toml``'s base image, installs exactly
  ``requirements-openai.txt``, runs as a non-root user and starts ``python -m openai_frontend``.
- ``requirements-openai.txt`` pins what ``requirements.txt`` pins, and is enough: in a fresh
  virtualenv with only those packages the front door imports (no torch, transformers or DALI
  is loaded) and serves.
- ``docker-compose.yml`` (validated by the real ``docker-compose config``): the ``openai`` and
  ``openai-vllm`` services use the image tag of ``stack.toml``, listen on the port they publish
  and probe, reach the gRPC port of the Triton service they wait for (healthy first).
- The compose healthcheck's own command passes against a real front door in front of the real
  CPU server, and fails against one whose Triton is gone.
- Prometheus scrapes both front doors.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from build_engines.stack import load_stack
from tests.helpers.deploy import compose_ports

ROOT = Path(__file__).resolve().parent.parent
STACK = load_stack()
DOCKERFILE = ROOT / "Dockerfile.openai"
REQUIREMENTS = ROOT / STACK.openai_frontend.requirements
PORT = int(STACK.openai_frontend.port)


def _pins(path: Path) -> dict[str, str]:
    """``{normalized name: version}`` of the ``name[extras]==version`` lines of a requirements file."""
    pins = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?==(\S+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(3)
    return pins


def test_dockerfile_uses_the_pinned_base_and_requirements_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    assert f"ARG BASE_IMAGE={STACK.openai_frontend.base_image}\n" in text
    assert f"COPY {STACK.openai_frontend.requirements} ." in text
    assert f"pip install --no-cache-dir -r {STACK.openai_frontend.requirements}" in text
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] not in ("root", "0"), users
    assert 'ENTRYPOINT ["python3", "-m", "openai_frontend"]' in text
    # What the front door imports from this project is copied in.
    for package in ("mmtriton/", "clients/", "openai_frontend/"):
        assert f"COPY {package} {package}" in text


def test_front_door_pins_equal_the_project_pins() -> None:
    door, project = _pins(REQUIREMENTS), _pins(ROOT / "requirements.txt")
    assert door, "no pins in the front door's requirements"
    assert {name: project.get(name) for name in door} == door


@pytest.fixture(scope="module")
def image_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python with exactly the image's packages: a fresh virtualenv, ``pip install -r`` the file."""
    venv = tmp_path_factory.mktemp("openai-image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", str(REQUIREMENTS)],
        check=True, timeout=900,
    )
    return python


def test_the_image_packages_are_enough_and_nothing_heavy_is_loaded(image_python: str) -> None:
    probe = (
        "import json, sys\n"
        "import openai_frontend.app, openai_frontend.__main__, uvicorn  # __main__ serves through openai_frontend.server\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [image_python, "-c", probe], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr  # an import the image's packages do not provide
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert {"fastapi", "uvicorn", "tritonclient", "openai_frontend"} <= loaded  # the probe did import
    for heavy in ("torch", "transformers", "nvidia", "tokenizers", "vllm"):
        assert heavy not in loaded, f"the front door imports {heavy}"


@pytest.fixture(scope="module")
def compose() -> dict:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail("docker-compose is missing (Debian package docker-compose; .ci/run installs it)")
    out = subprocess.run(
        [tool, "-f", str(ROOT / "docker-compose.yml"), "--profile", "vllm", "config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    return yaml.safe_load(out.stdout)


def _arg(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


@pytest.mark.parametrize(("service", "triton"), [("openai", "triton"), ("openai-vllm", "triton-vllm")])
def test_compose_front_door_wiring(compose: dict, service: str, triton: str) -> None:
    door = compose["services"][service]
    assert door["image"] == STACK.openai_frontend.tag
    assert door["build"]["dockerfile"] == "Dockerfile.openai"
    command = door["command"]
    assert int(_arg(command, "--port")) == PORT and _arg(command, "--host") == "0.0.0.0"
    published = {(target, port) for _, port, target in compose_ports(door)}
    assert (PORT, PORT) in published
    assert f"localhost:{PORT}/health" in " ".join(door["healthcheck"]["test"])
    host, grpc_port = _arg(command, "--triton-url").split(":")
    assert host == triton
    assert door["depends_on"][triton]["condition"] == "service_healthy"
    triton_targets = {target for _, _, target in compose_ports(compose["services"][triton])}
    assert int(grpc_port) in triton_targets  # the gRPC port the Triton service publishes
    assert door.get("read_only") is True
    assert _arg(command, "--bundle").startswith("/workspace/build/bundles/")
    targets = [v["target"] if isinstance(v, dict) else v.split(":")[1] for v in door["volumes"]]
    assert "/workspace/build/bundles" in targets
    assert ("vllm" in door.get("profiles", [])) == (service == "openai-vllm")


def test_prometheus_scrapes_both_front_doors() -> None:
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for sc in jobs["openai"]["static_configs"] for t in sc["targets"]}
    assert targets == {f"openai:{PORT}", f"openai-vllm:{PORT}"}


def test_compose_healthcheck_command_passes_only_while_triton_answers(
    compose: dict, image_python: str, grpc_url: str, bundle_dir: Path, tmp_path: Path
) -> None:
    """The front door runs from the image's package set, and its healthcheck tells up from down."""
    from tests.helpers.frontdoor import FrontDoor

    check = compose["services"]["openai"]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python3", "-c"]

    def healthy(door: FrontDoor) -> bool:
        code = check[3].replace(f"http://localhost:{PORT}", door.url)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0

    door = FrontDoor(grpc_url, bundle_dir, tmp_path / "up", python=image_python)
    try:
        assert healthy(door)
    finally:
        door.stop()
    # A front door whose Triton does not answer (nothing listens on that port).
    from mmtriton.serving.server import reserve_ports

    reservation = reserve_ports(1)  # held, so nothing else listens there meanwhile
    door = FrontDoor(f"127.0.0.1:{reservation.ports[0]}", bundle_dir, tmp_path / "down", python=image_python)
    try:
        assert not healthy(door)
    finally:
        door.stop()
        reservation.release()
