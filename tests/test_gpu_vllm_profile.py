"""The gpu-vllm compose profile, checked without a GPU or Docker.

What can be checked on a CPU: the gpu-vllm repository renders for the tiny-gpu
bundle and passes the schema and wiring checks; ``Dockerfile.vllm`` uses exactly
the images and versions ``build_engines/stack.toml`` pins; the requirements file
it installs with ``--no-deps`` is the reference wheel set the GPU tests ran with;
``docker-compose.yml`` validates with the real ``docker-compose`` and reserves as
many GPUs as the spec's ``tensor_parallel_size`` (through ``make gpu-vllm-up``);
and the server command refuses to start tritonserver when the GPUs it sees differ
from the rendered tensor parallel size (run here with stand-ins for
``nvidia-smi`` and ``tritonserver``).
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from build_engines.ensembles import check_wiring
from build_engines.render import PROFILES, python_engine_parameters, render_repository, verify_repository
from build_engines.stack import load_stack
from mmtriton.spec import ModelSpec, load_spec
from tests.helpers.deploy import compose_ports
from tests.helpers.deploy import APT_HINT, compose_validator

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile.vllm"
TINY_GPU_SPEC = ROOT / "build_engines" / "specs" / "tiny-gpu.toml"
GLM_SPEC = ROOT / "build_engines" / "specs" / "glm4-9b-shape.toml"
SHIPPED_SPECS = sorted((ROOT / "build_engines" / "specs").glob("*.toml"))
# The wheel set vLLM 0.26.0 ran with on the GPU host, kept in the repository (a copy of the team's
# shared reference, which a clean clone does not have beside it).
REFERENCE_WHEELS = ROOT / "docs" / "reference" / "vllm-0.26-gpu-host-wheels.txt"
VLLM_SERVICES = ("triton-vllm", "build-vllm-repo")


# --- helpers -----------------------------------------------------------------------------


def pinned(path: Path) -> list[tuple[str, str]]:
    """``(name, version)`` of every uncommented ``name==version`` line, in file order."""
    pins = []
    for line in path.read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", text)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        pins.append((match.group(1), match.group(2)))
    return pins


def dockerfile_args() -> dict[str, str]:
    """Default values of the ``ARG NAME=value`` lines of ``Dockerfile.vllm``."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def compose_config(env: dict[str, str]) -> dict:
    """``docker-compose.yml`` with the ``vllm`` profile as the real validator resolves it for ``env``."""
    validator = compose_validator()
    if validator is None:
        pytest.fail(f"no compose validator (docker-compose or the docker compose plugin); install: {APT_HINT}")
    base = {k: v for k, v in os.environ.items() if k not in ("SPEC", "SPEC_NAME", "VLLM_GPUS")}
    args = [*validator, "-f", str(COMPOSE), "--project-directory", str(ROOT), "--profile", "vllm", "config"]
    result = subprocess.run(args, cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def reserved_gpus(service: dict) -> int:
    """GPUs a resolved compose service reserves."""
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert all("gpu" in d["capabilities"] for d in devices)
    return sum(int(d["count"]) for d in devices)


def make_dry_run(*args: str) -> str:
    """``make -n`` output for the given targets and variables (SPEC from the environment ignored)."""
    # Also without the variables of a make that runs these tests (make test): a sub-make would print
    # "Entering directory" lines and inherit its flags.
    drop = ("SPEC", "SPEC_NAME", "VLLM_GPUS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        ["make", "--no-print-directory", "-n", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout


def rendered_tp(spec: ModelSpec) -> int:
    """The ``tensor_parallel_size`` the gpu-vllm profile renders for a spec."""
    return int(python_engine_parameters(spec, PROFILES["gpu-vllm"], "0")["tensor_parallel_size"])


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gpu() -> ModelSpec:
    return load_spec(TINY_GPU_SPEC)


@pytest.fixture(scope="module")
def vllm_repo(tiny_gpu_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_repository(tiny_gpu_bundle, tmp_path_factory.mktemp("repo") / "repo-gpu-vllm-tiny-gpu", "gpu-vllm")


# --- stack, image, wheel set ---------------------------------------------------------------


def test_stack_pins_the_vllm_the_gpu_tests_ran() -> None:
    vllm = load_stack().vllm
    assert (vllm.version, vllm.torch, vllm.torch_cuda, vllm.python) == ("0.26.0", "2.11.0", "13.0", "3.12")
    assert (vllm.numpy, vllm.scipy) == ("1.26.4", "1.17.1")
    assert vllm.image == f"nvcr.io/nvidia/tritonserver:{vllm.release}-vllm-python-py3"
    assert vllm.dali_source_image == f"nvcr.io/nvidia/tritonserver:{vllm.release}-py3"
    # The base's CUDA is the 13.0 toolkit torch's cu130 build needs.
    assert vllm.cuda.startswith(vllm.torch_cuda + ".") and vllm.torch_index.endswith("/cu" + vllm.torch_cuda.replace(".", ""))
    assert vllm.tag.endswith(f"{vllm.release}-vllm-{vllm.version}")


def test_dockerfile_matches_the_stack() -> None:
    vllm = load_stack().vllm
    args = dockerfile_args()
    assert args == {
        "TRITON_IMAGE": vllm.image,
        "DALI_SOURCE_IMAGE": vllm.dali_source_image,
        "VLLM_VERSION": vllm.version,
        "TORCH_VERSION": vllm.torch,
        "TORCHVISION_VERSION": vllm.torchvision,
        "TORCHAUDIO_VERSION": vllm.torchaudio,
        "TORCH_CUDA": vllm.torch_cuda,
        "TORCH_INDEX": vllm.torch_index,
        "NUMPY_VERSION": vllm.numpy,
        "SCIPY_VERSION": vllm.scipy,
        "TRANSFORMERS_VERSION": vllm.transformers,
        "TRITONCLIENT_VERSION": vllm.tritonclient,
    }
    text = DOCKERFILE.read_text()
    assert "FROM ${DALI_SOURCE_IMAGE} AS dali_source" in text and "FROM ${TRITON_IMAGE}\n" in text
    assert "COPY --from=dali_source /opt/tritonserver/backends/dali /opt/tritonserver/backends/dali" in text
    dali_path = load_stack().triton.dali_pythonpath
    assert f"RUN echo {dali_path} \\\n" in text and "triton-dali-backend.pth" in text
    assert not any(dali_path in p for p in re.findall(r"^ENV PYTHONPATH=(.*)$", text, flags=re.MULTILINE))
    assert f"ENV VLLM_USE_FLASHINFER_SAMPLER={vllm.flashinfer_sampler}\n" in text
    # The wheel set goes in without pip's resolver, then numpy<2 over it, both with --no-deps.
    assert f"COPY {vllm.requirements} /workspace/{vllm.requirements}" in text
    assert f"pip install --no-cache-dir --no-deps -r /workspace/{vllm.requirements}" in text
    assert 'pip install --no-cache-dir --no-deps "numpy==${NUMPY_VERSION}" "scipy==${SCIPY_VERSION}"' in text
    assert text.index("--no-deps -r") < text.index('--no-deps "numpy==')
    # The final check reads the same file and compares every version.
    check = text[text.rindex("RUN python3 -c") :]
    assert f"open('/workspace/{vllm.requirements}')" in check and "assert not bad, bad" in check
    assert "torch.version.cuda == '${TORCH_CUDA}'" in check and "found['vllm'] == '${VLLM_VERSION}'" in check
    for module in ("vllm", "nvidia.dali", "tritonclient.grpc.model_config_pb2", "mmtriton.llm.vllm_engine"):
        assert module in check, module


def test_requirements_are_the_reference_wheel_set() -> None:
    if not REFERENCE_WHEELS.is_file():
        pytest.fail(f"the reference wheel set is missing: {REFERENCE_WHEELS}")
    vllm = load_stack().vllm
    ours = pinned(ROOT / vllm.requirements)
    reference = pinned(REFERENCE_WHEELS)
    assert ours == reference
    assert len(ours) == int(vllm.wheels) and len({name.lower() for name, _ in ours}) == len(ours)
    assert ours[0] == ("vllm", vllm.version)


def test_pin_parser_refuses_a_range(tmp_path: Path) -> None:
    loose = tmp_path / "req.txt"
    loose.write_text("# comment\nvllm==0.26.0\nnumba>=0.65\n")
    with pytest.raises(AssertionError, match="not an exact pin: 'numba>=0.65'"):
        pinned(loose)


# --- the rendered repository -----------------------------------------------------------------


def test_gpu_vllm_repository_renders_for_the_tiny_gpu_bundle(vllm_repo: Path, tiny_gpu: ModelSpec) -> None:
    configs = verify_repository(vllm_repo)
    assert check_wiring(configs) == []
    llm = configs["tensorrt_llm"]
    params = {k: v.string_value for k, v in llm.parameters.items()}
    assert llm.backend == "python" and llm.model_transaction_policy.decoupled
    assert params["engine"] == "vllm"
    assert params["tensor_parallel_size"] == str(tiny_gpu.serving.tensor_parallel_size) == "1"
    # The image has the python backend (and DALI copied in); every model here runs on the python one.
    assert {c.backend for c in configs.values() if c.platform != "ensemble"} == {"python"}
    for name in ("image_preprocess", "audio_preprocess", "vision_encoder", "audio_encoder"):
        kinds = {group.kind for group in configs[name].instance_group}
        assert kinds == {configs[name].instance_group[0].KIND_GPU}, name
    assert '"device_id": 0' in (vllm_repo / "image_preprocess" / "1" / "preprocess.json").read_text()


# --- compose ------------------------------------------------------------------------------------


def test_compose_file_validates_with_the_vllm_profile() -> None:
    services = compose_config({})["services"]
    assert set(VLLM_SERVICES) <= set(services)
    assert reserved_gpus(services["triton-vllm"]) == 1


def test_default_up_starts_triton_and_its_front_door_only() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    # The OpenAI front door (openai) sits in front of triton; nothing of the vllm profile starts.
    assert sorted(name for name, s in services.items() if not s.get("profiles")) == ["openai", "triton"]
    for name in VLLM_SERVICES:
        assert services[name]["profiles"] == ["vllm"], name


def test_vllm_services_match_the_stack_and_carry_health_and_shm() -> None:
    vllm = load_stack().vllm
    services = compose_config({"SPEC_NAME": "tiny-gpu"})["services"]
    server, render = services["triton-vllm"], services["build-vllm-repo"]
    for service in (server, render):
        assert service["image"] == vllm.tag and service["build"]["dockerfile"] == "Dockerfile.vllm"
    assert render["restart"] == "no" and "deploy" not in render
    assert render["command"] == [
        "python3", "-m", "build_engines", "render", "--profile", "gpu-vllm",
        "--bundle", "build/bundles/tiny-gpu", "--out", "build/repo-gpu-vllm-tiny-gpu",
    ]  # fmt: skip
    assert server["depends_on"] == {"build-vllm-repo": {"condition": "service_completed_successfully"}}
    assert server["shm_size"] == "8gb" and server["ulimits"] == {"memlock": -1, "stack": 67108864}
    assert sorted(compose_ports(server)) == [("127.0.0.1", p, p) for p in (8000, 8001, 8002)]
    health = server["healthcheck"]
    assert health["test"][:4] == ["CMD", "python3", "-m", "mmtriton.probe"]
    deadline = float(health["test"][health["test"].index("--deadline-s") + 1])
    assert float(health["timeout"].rstrip("s")) >= 2 * deadline + 5
    assert health["start_period"] == "15m" and server["stop_grace_period"] == "60s"
    repo = "/workspace/build/repo-gpu-vllm-tiny-gpu"
    assert f"./build/repo-gpu-vllm-tiny-gpu:{repo}:ro" in yaml.safe_load(COMPOSE.read_text().replace(
        "${SPEC_NAME:-tiny-gpu}", "tiny-gpu"))["services"]["triton-vllm"]["volumes"]
    assert f"repo={repo};" in server["command"][2]
    assert f"--model-repository={repo}" in DOCKERFILE.read_text().split("CMD", 1)[1]


@pytest.mark.parametrize("spec_path", SHIPPED_SPECS, ids=[s.stem for s in SHIPPED_SPECS])
def test_gpus_reserved_equal_tensor_parallel_size(spec_path: Path) -> None:
    """make gpu-vllm-up passes the spec's TP as VLLM_GPUS; compose reserves exactly that many."""
    spec = load_spec(spec_path)
    dry = make_dry_run("gpu-vllm-up", f"SPEC={spec_path.relative_to(ROOT)}")
    up = [line for line in dry.splitlines() if "docker compose --profile vllm up -d triton-vllm" in line]
    assert len(up) == 1, dry
    given = dict(re.findall(r"(\w+)=(\S+)", up[0].split("docker compose", 1)[0]))
    assert given["SPEC_NAME"] == spec.name
    gpus = int(given["VLLM_GPUS"])
    assert gpus == spec.serving.tensor_parallel_size == rendered_tp(spec)
    services = compose_config(given)["services"]
    assert reserved_gpus(services["triton-vllm"]) == gpus
    assert f"repo=/workspace/build/repo-gpu-vllm-{spec.name};" in services["triton-vllm"]["command"][2]


def test_shipped_specs_tp_values() -> None:
    """The two GPU specs the profile serves: the smoke spec on one GPU, the 9B shape on two."""
    assert rendered_tp(load_spec(TINY_GPU_SPEC)) == 1 and rendered_tp(load_spec(GLM_SPEC)) == 2
    # The compose default (no VLLM_GPUS) is the default spec's TP.
    default = re.search(r"count: \$\{VLLM_GPUS:-(\d+)\}", COMPOSE.read_text())
    assert default and int(default.group(1)) == rendered_tp(load_spec(TINY_GPU_SPEC))


def _fake_tool(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.mark.parametrize(("gpus", "starts"), [(1, True), (2, False)])
def test_server_command_refuses_a_gpu_count_other_than_tp(
    vllm_repo: Path, tmp_path: Path, gpus: int, starts: bool
) -> None:
    """The compose command itself, run with stand-in nvidia-smi and tritonserver, against the rendered repo (TP 1)."""
    script = compose_config({"SPEC_NAME": "tiny-gpu"})["services"]["triton-vllm"]["command"]
    assert script[:2] == ["sh", "-c"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "nvidia-smi", "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'\n" for i in range(gpus)))
    record = tmp_path / "tritonserver.args"
    server = _fake_tool(bin_dir, "tritonserver", f'printf "%s\\n" "$@" > {record}\n')
    text = script[2].replace("$$", "$")
    text = text.replace("/workspace/build/repo-gpu-vllm-tiny-gpu", str(vllm_repo))
    text = text.replace("/opt/tritonserver/bin/tritonserver", str(server))
    python_dir = Path(sys.executable).parent
    if not (python_dir / "python3").exists():
        _fake_tool(bin_dir, "python3", f'exec {sys.executable} "$@"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{python_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(["sh", "-c", text], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    if starts:
        assert result.returncode == 0, result.stderr
        args = record.read_text().splitlines()
        assert f"--model-repository={vllm_repo}" in args and "--disable-auto-complete-config" in args
        assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
    else:
        assert result.returncode == 2 and not record.exists()
        assert f"has tensor_parallel_size 1 but {gpus} GPU(s) are reserved; set VLLM_GPUS=1" in result.stderr


# --- Makefile and docs -----------------------------------------------------------------------------


def test_make_targets_exist_and_build_the_vllm_image() -> None:
    makefile = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", makefile, flags=re.MULTILINE)
    assert phony and {"gpu-vllm-image", "gpu-vllm-up"} <= set(phony.group(1).split())
    assert make_dry_run("gpu-vllm-image").strip() == "docker compose --profile vllm build triton-vllm"
    dry = make_dry_run("gpu-vllm-up")
    assert "-m build_engines bundle --spec build_engines/specs/tiny-gpu.toml --out build/bundles/tiny-gpu" in dry
    assert "SPEC_NAME=tiny-gpu VLLM_GPUS=1 docker compose --profile vllm up -d triton-vllm" in dry


def test_make_reads_the_spec_whatever_its_toml_spacing(tmp_path: Path) -> None:
    """The Makefile reads name and tensor_parallel_size through mmtriton/spec.py: quotes, spacing and defaults."""
    text = TINY_GPU_SPEC.read_text()
    odd = tmp_path / "odd.toml"
    odd.write_text(
        text.replace('name = "tiny-gpu"', "name='odd-spaced'  # a comment")
        .replace("tensor_parallel_size = 1 ", "tensor_parallel_size=2 ")
    )
    dry = make_dry_run("gpu-vllm-up", f"SPEC={odd}")
    assert "SPEC_NAME=odd-spaced VLLM_GPUS=2 docker compose --profile vllm up -d triton-vllm" in dry
    assert "--out build/bundles/odd-spaced" in dry
    assert "--repo build/repo-cpu-odd-spaced " in make_dry_run("demo", f"SPEC={odd}")
    # A spec that leaves tensor_parallel_size out gets the spec format's default, not one the Makefile restates.
    default = tmp_path / "default.toml"
    default.write_text(re.sub(r"(?m)^tensor_parallel_size = .*\n", "", text))
    assert "tensor_parallel_size" not in default.read_text()
    assert load_spec(default).serving.tensor_parallel_size == 1
    assert "SPEC_NAME=tiny-gpu VLLM_GPUS=1 " in make_dry_run("gpu-vllm-up", f"SPEC={default}")
    # A spec that cannot be read stops make before any command runs.
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace("[serving]", "[serving]\nbogus = 1"))
    env = {k: v for k, v in os.environ.items() if k not in ("SPEC", "MAKEFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "-n", "demo", f"SPEC={broken}"], cwd=ROOT, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0 and "unknown key(s) ['bogus']" in result.stderr
    assert f"cannot read the spec SPEC={broken}" in result.stderr and result.stdout == ""


def test_docs_name_the_vllm_commands() -> None:
    docs = (ROOT / "docs" / "gpu-hosts.md").read_text()
    section = docs[docs.index("## vLLM profile") :]
    for command in ("make gpu-vllm-image", "make gpu-vllm-up SPEC=build_engines/specs/glm4-9b-shape.toml",
                    "docker compose --profile vllm ps", "triton-vllm", "build-vllm-repo", "VLLM_GPUS"):
        assert command in section, command
    targets = set(re.findall(r"^([a-z][a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    assert set(re.findall(r"\bmake ([a-z][a-z-]+)", section)) <= targets


def test_triton_endpoints_are_published_on_loopback_only() -> None:
    """Triton 2.51's own endpoints do not survive every hostile input (a deeply nested JSON body
    crashes its HTTP endpoint): compose publishes them on the host's loopback only, while the front
    door, the public API, listens on every interface."""
    services = compose_config({})["services"]
    for name in ("triton", "triton-vllm"):
        published = [(host, target) for host, _, target in compose_ports(services[name])]
        assert sorted(published) == [("127.0.0.1", 8000), ("127.0.0.1", 8001), ("127.0.0.1", 8002)], (name, published)
    assert compose_ports(services["openai-vllm"]) == [("0.0.0.0", 9000, 9000)]
