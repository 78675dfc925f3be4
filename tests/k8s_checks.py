"""Helpers of ``tests/test_k8s.py`` and ``tests/test_k8s_runtime.py``: render the Kustomize overlays, validate objects offline, read pod specs.

Built-in kinds are validated against the Kubernetes API's JSON schemas that the
``kubernetes-validate`` wheel ships (strict: unknown fields fail), for the Kubernetes
minor of the ``kubectl`` that renders them. The prometheus-operator ``PodMonitor``
has no schema there: :func:`check_podmonitor` checks its structure (the fields
this deployment uses, with their types, as the ``monitoring.coreos.com/v1`` CRD
defines them; anything else fails).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from build_engines.stack import load_stack
from tools import k8s_capacity

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("vllm-1gpu", "vllm-tp2", "trtllm-tp2")
#: The Kubernetes minor whose schemas validate the objects (that of kubectl v1.32 here).
KUBE_VERSION = "1.32.0"

Obj = dict[str, Any]


def kubectl() -> str:
    """Path of ``kubectl`` (Kustomize is built in); the test fails without it."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl (with its built-in Kustomize) is not installed; it renders deploy/k8s")
    return path


@functools.lru_cache(maxsize=None)
def _render_text(folder: str) -> str:
    # Plain, as operators run it (kubectl apply -k): Kustomize's default load restrictor applies.
    result = subprocess.run([kubectl(), "kustomize", folder], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"kubectl kustomize {folder} failed:\n{result.stderr}"
    return result.stdout


def render(overlay: str) -> list[Obj]:
    """Every object of ``deploy/k8s/overlays/<overlay>`` as ``kubectl kustomize`` renders it."""
    return [obj for obj in yaml.safe_load_all(_render_text(str(K8S / "overlays" / overlay))) if obj]


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    """The one object of ``kind`` named ``name``."""
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    """The pod spec of a Deployment or Job."""
    return obj["spec"]["template"]["spec"]


def container(obj: Obj, name: str) -> Obj:
    """A container (not an init container) of a workload by name."""
    found = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{obj['metadata']['name']}: container {name!r}"
    return found[0]


def arg(command: list[str], flag: str) -> str:
    """The value after ``flag`` in an argument list."""
    return command[command.index(flag) + 1]


def validator() -> Any:
    """The ``kubernetes_validate`` module; the test fails (not skips) without it."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install -r requirements.txt")
    return kubernetes_validate


def validate_builtin(obj: Obj) -> None:
    """Validate one built-in object against the Kubernetes JSON schema, strictly.

    Raises:
        jsonschema.ValidationError: The object does not validate (the path and reason are in it).
        kubernetes_validate.utils.SchemaNotFoundError: No schema for its kind and apiVersion.
    """
    validator().validate(obj, KUBE_VERSION, strict=True)


# --- prometheus-operator PodMonitor (monitoring.coreos.com/v1), structural ------------------------

_LABEL_SELECTOR = {"matchLabels": dict, "matchExpressions": list}
_ENDPOINT = {
    "port": str,
    "portNumber": int,
    "path": str,
    "interval": str,
    "scrapeTimeout": str,
    "scheme": str,
    "honorLabels": bool,
    "relabelings": list,
    "metricRelabelings": list,
}
_PODMONITOR_SPEC = {
    "selector": _LABEL_SELECTOR,
    "namespaceSelector": {"any": bool, "matchNames": list},
    "podMetricsEndpoints": [_ENDPOINT],
    "jobLabel": str,
    "podTargetLabels": list,
    "sampleLimit": int,
}
_DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def _check_shape(value: Any, shape: Any, where: str) -> list[str]:
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected an object"]
        problems = [f"{where}.{key}: unknown field" for key in value if key not in shape]
        for key, sub in value.items():
            if key in shape:
                problems += _check_shape(sub, shape[key], f"{where}.{key}")
        return problems
    if isinstance(shape, list):
        if not isinstance(value, list) or not value:
            return [f"{where}: expected a non-empty list"]
        return [p for i, item in enumerate(value) for p in _check_shape(item, shape[0], f"{where}[{i}]")]
    if shape is int and isinstance(value, bool):
        return [f"{where}: expected int"]
    return [] if isinstance(value, shape) else [f"{where}: expected {shape.__name__}"]


def check_podmonitor(obj: Obj) -> list[str]:
    """Problems of a ``PodMonitor`` (empty when it is well formed).

    The CRD requires ``spec.selector``; durations follow Prometheus' duration format; a
    metrics endpoint names its port by ``port`` (container port name) or ``portNumber``.
    """
    problems = []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1" or obj.get("kind") != "PodMonitor":
        problems.append("apiVersion/kind must be monitoring.coreos.com/v1 PodMonitor")
    unknown = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    problems += [f"{key}: unknown field" for key in sorted(unknown)]
    meta = obj.get("metadata", {})
    if not isinstance(meta.get("name"), str) or not meta["name"]:
        problems.append("metadata.name: required")
    spec = obj.get("spec")
    if not isinstance(spec, dict) or "selector" not in spec:
        return problems + ["spec.selector: required"]
    problems += _check_shape(spec, _PODMONITOR_SPEC, "spec")
    for i, endpoint in enumerate(spec.get("podMetricsEndpoints", [])):
        if isinstance(endpoint, dict):
            if "port" not in endpoint and "portNumber" not in endpoint:
                problems.append(f"spec.podMetricsEndpoints[{i}]: port or portNumber required")
            for key in ("interval", "scrapeTimeout"):
                if isinstance(endpoint.get(key), str) and not _DURATION.match(endpoint[key]):
                    problems.append(f"spec.podMetricsEndpoints[{i}].{key}: not a duration")
    return problems


# --- ports and selectors ----------------------------------------------------------------------------


def container_ports(c: Obj) -> dict[str | int, int]:
    """``{name or number: number}`` of a container's ports."""
    ports: dict[str | int, int] = {}
    for port in c.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    """Whether a ``matchLabels`` selector (the only form used here) matches ``labels``."""
    assert set(selector) <= {"matchLabels"}, f"unsupported selector {selector}"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_allowed(
    policies: list[Obj],
    *,
    dst_labels: dict[str, str],
    port: int,
    src_labels: dict[str, str],
    src_namespace_labels: dict[str, str],
    same_namespace: bool,
) -> bool:
    """Whether NetworkPolicies (ingress, additive) let a source pod reach ``port`` of a destination pod.

    Only the forms this deployment uses are understood (``podSelector`` / ``namespaceSelector``
    peers with ``matchLabels``, numeric TCP ports); anything else fails the test.
    """
    applying = [p for p in policies if selects(p["spec"]["podSelector"], dst_labels)]
    if not applying:
        return True
    for policy in applying:
        assert policy["spec"]["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports is not None:
                assert all(p.get("protocol", "TCP") == "TCP" and isinstance(p["port"], int) for p in ports)
                if port not in {p["port"] for p in ports}:
                    continue
            peers = rule.get("from")
            if peers is None:
                return True
            for peer in peers:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                if "namespaceSelector" in peer:
                    ns_ok = selects(peer["namespaceSelector"], src_namespace_labels)
                else:
                    ns_ok = same_namespace
                pod_ok = selects(peer["podSelector"], src_labels) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


STACK = load_stack()


SPECS = ROOT / "build_engines" / "specs"


COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


DASHBOARD = ROOT / "monitoring" / "grafana" / "dashboards" / "triton.json"


#: The monitoring Kustomization's own copy of DASHBOARD (Kustomize reads no file outside its folder).
DASHBOARD_COPY = K8S / "monitoring" / "triton.json"


REPORT = k8s_capacity.DEFAULT_REPORT


#: overlay -> (profile, spec name, compose service it translates)
OVERLAY_SPECS = {
    "vllm-1gpu": ("gpu-vllm", "tiny-gpu", "triton-vllm"),
    "vllm-tp2": ("gpu-vllm", "glm4-9b-shape", "triton-vllm"),
    "trtllm-tp2": ("gpu-trtllm", "tiny-gpu", "triton"),
}


NAMESPACE_LABELS = {"mmtriton": {"kubernetes.io/metadata.name": "mmtriton"}}


MONITORING_LABELS = {"kubernetes.io/metadata.name": "monitoring"}


TRITON_EXIT_TIMEOUT_S = 30  # --exit-timeout-secs of the vLLM command and tp_launcher's default


def workloads(objs: list[dict]) -> list[dict]:
    return [o for o in objs if o["kind"] in ("Deployment", "Job")]


def quantity_bytes(text: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "gb": 2**30, "mb": 2**20}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|gb|mb)", str(text))
    assert match, text
    return int(match.group(1)) * units[match.group(2)]


def adapter_rules(objs: list[dict]) -> list[dict]:
    config = find(objs, "ConfigMap", "mmtriton-prometheus-adapter-rules")
    return yaml.safe_load(config["data"]["config.yaml"])["rules"]
