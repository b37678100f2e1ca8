"""The layers of ARCHITECTURE.md, read from the source with `ast`: imports go down only.

    API      instrument/__init__, instrument/__main__, instrument/cli, instrument/commands/, instrument/context/,
             instrument/models/
    methods  methods/
    core     the rest of instrument/ (never imports methods)

An edge is an `import X` or `from X import Y` that runs when the module is imported (outside function
bodies); importing a submodule runs its parent package's `__init__` too, but that implicit edge is not
counted: the package `instrument` is the API, and its core submodules must be importable below it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("instrument", "methods")
API = ("instrument", "instrument.__main__", "instrument.cli", "instrument.patching", "instrument.readouts")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def import_time_nodes(tree: ast.Module):
    """Statements run at import: the module body and class bodies, not function bodies."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    is_package = path.name == "__init__.py"
    found = set()
    for node in import_time_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", None) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            targets = [node.args[0].value]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def layer(name: str) -> str:
    if name in API or name.startswith(("instrument.models", "instrument.commands", "instrument.context")):
        return "api"
    return "methods" if name.split(".")[0] == "methods" else "core"


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return groups


def test_the_graph_is_read():
    edges = graph()
    assert "instrument.trace" in edges and "methods.base" in edges
    assert "instrument.trace" in edges["instrument"]  # the package exports trace


def test_no_module_level_cycle():
    assert cycles(graph()) == []


def test_imports_go_down_only():
    order = {"core": 0, "methods": 1, "api": 2}
    upward = [
        (name, target)
        for name, targets in graph().items()
        for target in targets
        if order[layer(target)] > order[layer(name)]
    ]
    assert upward == [], "imports from a lower layer to a higher one"


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def run_python(code: str, cwd: Path, extra_path: Path | None = None):
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (extra_path, ROOT) if p is not None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_either_package_can_be_imported_first(tmp_path):
    check = "; assert 'saliency' in instrument.list_feature_attribution_methods()"
    for code in ("import methods, instrument", "import instrument, methods", "import methods.gradient, instrument"):
        done = run_python(code + check, tmp_path)
        assert done.returncode == 0, (code, done.stderr[-2000:])


def test_another_methods_module_is_named_clearly(tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "methods.py").write_text("x = 1\n")
    done = run_python("import instrument", tmp_path, extra_path=shadow)
    assert done.returncode != 0
    assert "not seq-instrument's methods package" in done.stderr and "methods.py" in done.stderr
