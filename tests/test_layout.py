"""The package's shape: modules small enough to read, the node's wiring class small, and no
import cycles between modules (imports inside functions and TYPE_CHECKING blocks count)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "m3tgossip"
MAX_MODULE_LINES = 500
MAX_NODE_CLASS_LINES = 250


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules of the package that `path` (module `name`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_package else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    out.add(sub)  # `from package import module`
                elif target in known:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> nx.DiGraph:
    mods = modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(mods)
    for name, path in mods.items():
        for target in imported(path, name, set(mods)):
            graph.add_edge(name, target)
    return graph


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_the_class_that_wires_a_node_is_small() -> None:
    tree = ast.parse((PACKAGE / "daemon" / "node.py").read_text())
    (node,) = [c for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "Node"]
    length = node.end_lineno - node.lineno + 1
    assert length <= MAX_NODE_CLASS_LINES, f"class Node is {length} lines"


def test_no_two_modules_import_each_other() -> None:
    graph = import_graph()
    cycles = [c for c in nx.simple_cycles(graph) if len(c) > 1]
    # a package's __init__ re-exports its modules; a module importing its own package's
    # __init__ would close a cycle, and shows up here like any other
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:10])


def test_only_the_edu_package_imports_torch() -> None:
    heavy = {"torch", "peft", "transformers", "sklearn"}
    found = []
    for path in PACKAGE.rglob("*.py"):
        if "edu" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            for n in names:
                if n.split(".")[0] in heavy:
                    found.append(f"{path.relative_to(PACKAGE)}: {n}")
    assert not found, found
