"""The house's structure: the core imports neither Ray nor the speed package, and nothing imports in a circle
(every import statement counts, those inside functions too)."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "nodekd_ray"


def _module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set:
    """Every module this file imports, as dotted names (relative imports resolved; `from . import x` gives x)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}    # `from pkg import module`
    return out


def _graph() -> dict:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}, files


def _core(m: str) -> bool:
    return not (m.startswith("nodekd_ray.orchestration") or m.startswith("nodekd_ray.speed")
                or m in ("nodekd_ray.cli",))


def test_the_core_imports_neither_ray_nor_the_speed_package():
    graph, files = _graph()
    for m, path in files.items():
        if not _core(m):
            continue
        imports = _imports(path)
        assert not any(i == "ray" or i.startswith("ray.") for i in imports), f"{m} imports Ray"
        assert not any(i.startswith("nodekd_ray.speed") for i in imports), f"{m} imports the speed package"
        assert not any(i.startswith("nodekd_ray.orchestration") for i in imports), f"{m} imports orchestration"


def test_nothing_imports_in_a_circle():
    graph, _ = _graph()
    # a package's __init__ importing its own modules is not a circle with them
    edges = {m: {i for i in deps if not (m == i.rsplit(".", 1)[0] or i == m.rsplit(".", 1)[0])}
             for m, deps in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_the_circle_check_finds_a_circle(tmp_path, monkeypatch):
    """The check above can fail: two modules importing each other (inside a function) are found."""
    pkg = tmp_path / "nodekd_ray"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "b.py").write_text("from . import a\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    try:
        test_nothing_imports_in_a_circle()
    except AssertionError as e:
        assert "nodekd_ray.a -> nodekd_ray.b -> nodekd_ray.a" in str(e) or "nodekd_ray.b -> nodekd_ray.a" in str(e)
    else:
        raise AssertionError("the circle was not found")
