"""The import graph: no cycles, and no module imports one that stands above it
(cli -> suites -> training -> adapters / backbone / tasks / cache -> io and errors)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "inca"

# The layer of each module (by dotted-name prefix, longest match wins): a module may import its own layer or lower.
LAYERS = {
    "inca.errors": 0, "inca.io": 0, "inca.devices": 0, "inca.report": 0, "inca.recipe": 0, "inca.options": 0,
    "inca.progress": 0, "inca.distributed": 0, "inca.memory": 0, "inca.config": 0, "inca.registry": 0,
    "inca.images": 0, "inca.training_log": 0, "inca.outputs": 0,
    "inca.backbone": 1, "inca.tasks": 1, "inca.cache": 1, "inca.adapters": 1, "inca.quantize": 1,
    "inca.activations": 2, "inca.placement": 2, "inca.train": 2, "inca.methods": 2, "inca.probes": 2,
    "inca.inference": 2, "inca.export": 2,
    "inca.suite": 3, "inca.training": 3, "inca.compare": 3, "inca.convergence": 3, "inca.probe": 3,
    "inca.probe_report": 3, "inca.prediction": 3, "inca.api": 3,
    "inca.cli": 4, "inca.__main__": 4,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Every inca module imported anywhere in ``path`` (top level or inside functions). ``from pkg import mod``
    counts as importing ``pkg.mod`` only: a package's ``__init__`` runs first, but it is not what is used."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
    return {name for name in found if name in modules}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        if name == "inca":  # the lazy public API (PEP 562) imports on attribute access only
            continue
        edges[name] = imports(path, name, set(modules)) - {name, "inca"}
    return edges


def test_no_module_imports_a_higher_layer():
    upward = [(m, t) for m, targets in graph().items() for t in targets if layer(t) > layer(m)]
    assert not upward, upward


def test_import_graph_has_no_cycles():
    edges, state, cycles = graph(), {}, []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles
