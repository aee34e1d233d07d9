"""The package's modules import one another one way: no cycle, counting the imports inside
functions too (a lazy import that points back up is a cycle waiting for the next refactor)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "maxl_jax"


def module_name(path: pathlib.Path) -> str:
    parts = ("maxl_jax",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: the maxl_jax modules it imports}``, every ``import`` statement of its source (at
    any depth). ``from maxl_jax.x import y`` imports ``maxl_jax.x.y`` when that is a module, else
    ``maxl_jax.x``; the implicit import of a module's parent packages is not an edge."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if full in modules:
                        edges.add(full)
                    elif node.module in modules:
                        edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "maxl_jax.meta.unroll" in graph and "maxl_jax.validation" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_import_back():
    graph = import_graph()
    graph["maxl_jax.validation"] = graph["maxl_jax.validation"] | {"maxl_jax.methods"}
    assert find_cycle(graph) is not None
