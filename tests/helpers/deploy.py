"""Deployment files and stand-ins: compose and its validator, Prometheus exposition names, fake engines and bundles for the gpu-trtllm plan."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from build_engines.encoder_io import AUDIO_IO, VISION_IO, EncoderIO
from mmtriton.spec import ModelSpec
from tests.conftest import ROOT

# The GPU smoke spec (head size 32, float16); tiny.toml (head size 16) is the CPU profile's.
TINY_SPEC = ROOT / "build_engines" / "specs" / "tiny-gpu.toml"


COMPOSE = ROOT / "docker-compose.yml"


DOCKERFILE = ROOT / "Dockerfile"


def write_fake_engine(path: Path, *, tp: int, pp: int = 1, world: int | None = None, ranks: int | None = None) -> Path:
    """An engine folder shaped like trtllm-build output: config.json + rank<N>.engine."""
    path.mkdir(parents=True, exist_ok=True)
    mapping = {"world_size": tp * pp if world is None else world, "tp_size": tp, "pp_size": pp, "cp_size": 1, "rank": 0}
    config = {"version": "1.2.1", "pretrained_config": {"architecture": "LlamaForCausalLM", "mapping": mapping}}
    config["build_config"] = {"max_batch_size": 8}
    (path / "config.json").write_text(json.dumps(config))
    for rank in range(tp * pp if ranks is None else ranks):
        (path / f"rank{rank}.engine").write_bytes(b"")
    return path


def write_identity_onnx(path: Path, io: EncoderIO) -> None:
    import onnx
    from onnx import TensorProto, helper

    types = {"lengths": TensorProto.INT64, "out_lengths": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in io.inputs]
    outputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in io.outputs]
    nodes = [helper.make_node("Identity", [i], [o]) for i, o in zip(io.inputs, io.outputs, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(helper.make_graph(nodes, path.parent.name, inputs, outputs)), str(path))


def write_fake_bundle(root: Path, spec: ModelSpec) -> Path:
    """A bundle folder with the real layout and ONNX graphs with the real names (no weights)."""
    bundle = root / "bundles" / spec.name
    (bundle / "llm").mkdir(parents=True)
    (bundle / "llm" / "config.json").write_text("{}")
    write_identity_onnx(bundle / "vision_encoder" / "model.onnx", VISION_IO)
    write_identity_onnx(bundle / "audio_encoder" / "model.onnx", AUDIO_IO)
    (bundle / "bundle.json").write_text(json.dumps({"spec": spec.to_dict()}))
    return bundle


APT_HINT = "apt-get install -y --no-install-recommends docker-compose prometheus"


def prometheus_metric_names(exposition: str) -> set[str]:
    """Metric family names in Prometheus text exposition (e.g. a server's ``/metrics``).

    A conftest fixture ``cpu_server_metric_names`` can return this for the CPU
    server's ``/metrics``; the dashboard test then checks against it.
    """
    names = set(re.findall(r"^# TYPE ([A-Za-z_:][A-Za-z0-9_:]*) ", exposition, flags=re.MULTILINE))
    names |= set(re.findall(r"^([A-Za-z_:][A-Za-z0-9_:]*)[{ ]", exposition, flags=re.MULTILINE))
    return names


def compose_validator() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def compose_ports(service: dict) -> list[tuple[str, int, int]]:
    """``(host address, published port, container port)`` of a resolved compose service's ports.

    ``docker-compose config`` writes a port as a mapping (``target``, ``published``, ``host_ip``)
    or, for ``"127.0.0.1:8001:8001"``, as the string ``127.0.0.1:8001:8001/tcp``; both are read.
    """
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append((port.get("host_ip") or "0.0.0.0", int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        host = parts[0] if len(parts) == 3 else "0.0.0.0"
        out.append((host, int(parts[-2]) if len(parts) >= 2 else int(parts[-1]), int(parts[-1])))
    return out
