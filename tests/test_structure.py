"""The package's shape: no import circle between edgetune's modules (counting imports inside
functions too: a lazy import hides a circle from Python, not from the reader), and no
source file over 600 lines."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"edgetune": "edgetune", "kernels": "edgetune.kernels"}  # dir -> installed name
MAX_LINES = 600


def _modules(suffixes: tuple[str, ...] = ("*.py",)) -> dict[str, Path]:
    mods = {}
    for folder, name in PACKAGES.items():
        for f in (p for s in suffixes for p in (ROOT / folder).rglob(s)):
            parts = [name] + list(f.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` (a module or a name inside one) refers to."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    mods = _modules(("*.py", "*.pyx"))  # a compiled module (Cython) is a leaf
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if path.suffix != ".py":
            continue
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                dep = _resolve(t, mods)
                if dep is not None and dep != mod:
                    graph[mod].add(dep)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (c := visit(d)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_checker_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert "edgetune.train.recipe" in graph["edgetune.train.loop"]
    assert "edgetune.train.loop" in graph["edgetune.train"]  # the lazy import in __init__


def test_recipe_imports_nothing_above_it():
    graph = import_graph()
    for above in ("edgetune.train.loop", "edgetune.train.engines", "edgetune.train.launch"):
        assert above not in graph["edgetune.train.recipe"]


def test_no_file_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
