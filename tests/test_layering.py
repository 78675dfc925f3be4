"""The import graph: the runtime never imports build code, clients stand alone, no cycles.

Every ``import`` and ``from ... import`` in the project's Python files counts, also
those inside functions. ``python -m pytest tests/test_layering.py -v`` shows the rules;
a failure names the offending file and import.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mmtriton", "build_engines", "clients", "bench", "tools", "openai_frontend")

# Who may import whom (besides the standard library and third-party packages).
ALLOWED = {
    "mmtriton": set(),  # the runtime: spec, contract, glue, engines, launchers
    "model_repository": {"mmtriton"},  # python-backend models are thin adapters over the runtime
    "clients": {"mmtriton.contract"},  # tritonclient, numpy and the contract: what an application installs
    "build_engines": {"mmtriton"},  # bundle, render, build plan: on top of the runtime
    "bench": {"mmtriton", "clients"},
    "tools": {"mmtriton", "clients", "bench", "build_engines"},
    # The OpenAI front door: an application of the clients, plus the contract's names and the
    # real-inference probe and the model spec (its image has no torch, transformers or DALI).
    "openai_frontend": {"mmtriton.contract", "mmtriton.spec", "mmtriton.serving.probe", "clients"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "model_repository":
        return "model_repository." + ".".join(parts[1:])
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_files() -> list[Path]:
    files = [p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py")]
    files += sorted((ROOT / "model_repository").glob("*/1/*.py"))
    return sorted(p for p in files if "__pycache__" not in p.parts)


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Project modules a file imports, with line numbers (module-level and local imports)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import mod`` may name a submodule: count both.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [(name, node.lineno) for name in names if name.split(".")[0] in PACKAGES]
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in project_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _ in imports_of(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_it_may(layer: str) -> None:
    bad = []
    for path in project_files():
        if _module_name(path).split(".")[0] != layer:
            continue
        for name, line in imports_of(path):
            top = name.split(".")[0]
            allowed = top == layer or top in ALLOWED[layer] or any(
                name == module or name.startswith(module + ".") for module in ALLOWED[layer]
            )
            message = f"{path.relative_to(ROOT)}:{line} imports {name}"
            if not allowed and message not in bad:
                bad.append(message)
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer]) or 'no project package'}:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], f"modules that import each other (directly or through others): {cycles}"


def test_the_walker_sees_local_imports_and_cycles() -> None:
    """The checks themselves can fail: a local import and a two-module cycle are found."""
    tree = "def f():\n    from build_engines.render import parse_config\n"
    node = ast.parse(tree)
    names = [n.module for n in ast.walk(node) if isinstance(n, ast.ImportFrom)]
    assert names == ["build_engines.render"]
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


# The runtime's rooms (mmtriton/<room>/) and what each may import of the runtime besides itself.
# Media, encoders and the LLM step know nothing of each other: they meet only in the contract
# (tensor names, InputError) and the spec; serving runs Triton and never imports a pipeline room.
RUNTIME_ROOMS = {
    "mmtriton.contract": set(),
    "mmtriton.spec": set(),
    "mmtriton.media": {"mmtriton.contract", "mmtriton.spec"},
    "mmtriton.encoders": {"mmtriton.contract", "mmtriton.spec"},
    "mmtriton.llm": {"mmtriton.contract", "mmtriton.spec"},
    "mmtriton.backend": {"mmtriton.contract", "mmtriton.spec"},
    "mmtriton.serving": {"mmtriton.contract", "mmtriton.spec"},
    # The command-line names kept at the top (python -m mmtriton.server, .probe, .tp_launcher).
    "mmtriton.server": {"mmtriton.serving"},
    "mmtriton.probe": {"mmtriton.serving"},
    "mmtriton.tp_launcher": {"mmtriton.serving"},
}


def _room_of(module: str) -> str | None:
    """The room a runtime module belongs to (the longest matching name), or None."""
    found = [room for room in RUNTIME_ROOMS if module == room or module.startswith(room + ".")]
    return max(found, key=len) if found else None


def room_violations(imports: dict[str, set[str]]) -> list[str]:
    """``importer -> imported`` pairs inside ``mmtriton`` that break :data:`RUNTIME_ROOMS`.

    Args:
        imports: For each module, the project modules it imports.
    """
    bad = []
    for module, targets in sorted(imports.items()):
        room = _room_of(module)
        if not module.startswith("mmtriton"):
            continue
        if room is None:
            bad.append(f"{module} is in no room (add it to one of {sorted(RUNTIME_ROOMS)})")
            continue
        for target in sorted(targets):
            if not target.startswith("mmtriton"):
                continue
            other = _room_of(target)
            if other != room and other not in RUNTIME_ROOMS[room]:
                bad.append(f"{module} imports {target}: {room} may import only {sorted(RUNTIME_ROOMS[room]) or 'nothing of the runtime'}")
    return bad


def test_runtime_rooms_import_only_what_they_may() -> None:
    graph = {m: t for m, t in _graph().items() if m != "mmtriton"}  # the package's empty __init__
    assert not room_violations(graph), "\n".join(room_violations(graph))


@pytest.mark.parametrize(
    ("importer", "imported"),
    [
        ("mmtriton.media.preprocess", "mmtriton.llm.prompting"),  # media knows nothing of the LLM step
        ("mmtriton.llm.prompting", "mmtriton.media.validation"),  # InputError lives in the contract
        ("mmtriton.encoders.batching", "mmtriton.media.dali_runner"),
        ("mmtriton.serving.server", "mmtriton.llm.vllm_engine"),  # serving never imports a pipeline room
        ("mmtriton.contract", "mmtriton.spec"),  # the contract imports nothing of the project
        ("mmtriton.probe", "mmtriton.llm.generation"),  # a command-line name only forwards to serving
    ],
)
def test_each_room_rule_can_fail(importer: str, imported: str) -> None:
    assert room_violations({importer: {imported}}), f"{importer} -> {imported} should break a rule"


def test_a_module_outside_every_room_is_reported() -> None:
    assert room_violations({"mmtriton.newthing": set()}) == [
        f"mmtriton.newthing is in no room (add it to one of {sorted(RUNTIME_ROOMS)})"
    ]
    assert room_violations({"mmtriton.media.preprocess": {"mmtriton.contract", "mmtriton.media.validation"}}) == []


def test_no_test_module_imports_another() -> None:
    """No test module imports another: what tests share lives in tests/helpers/, tests/reference.py
    (the independent references), tests/bad_inputs.py and tests/conftest.py."""
    assert imports_of_test_modules(ROOT / "tests") == []


def imports_of_test_modules(folder: Path) -> list[str]:
    """``file:line imports tests.test_x`` for every import of a test module inside ``folder``."""
    bad = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for name in names:
                if re.match(r"tests\.test_\w+$", name):
                    bad.append(f"{path.name}:{node.lineno} imports {name}")
    return sorted(set(bad))


def test_the_test_import_rule_can_fail(tmp_path: Path) -> None:
    (tmp_path / "test_a.py").write_text("from tests.test_b import helper\n")
    (tmp_path / "test_c.py").write_text("def f():\n    import tests.test_d\n")
    (tmp_path / "helpers.py").write_text("from tests.reference import image_reference\n")
    assert imports_of_test_modules(tmp_path) == ["test_a.py:1 imports tests.test_b", "test_c.py:2 imports tests.test_d"]
