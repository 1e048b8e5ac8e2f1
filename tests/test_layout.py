"""The layout rules of docs/design.md, held by the code itself: no module of the project over 400
lines, no import cycle between the project's modules, and no import of one inside a function (the
way a cycle hides)."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT = 400
WIDTH = 100
PACKAGES = ("keep", "evals", "sweeps")


def modules():
    """{module name: path} of the root's modules and the packages'."""
    found = {f[:-3]: os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}
    for package in PACKAGES:
        folder = os.path.join(ROOT, package)
        if os.path.isdir(folder):
            found.update({f"{package}.{f[:-3]}": os.path.join(folder, f)
                          for f in os.listdir(folder) if f.endswith(".py") and f != "__init__.py"})
    return found


def imports(path, names):
    """[(project module imported, whether at the top level)] of one file."""
    tree = ast.parse(open(path).read())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        out += [(t, id(node) in top) for t in targets if t in names]
    return out


def test_no_module_is_over_400_lines():
    sizes = {name: sum(1 for _ in open(path)) for name, path in modules().items()}
    assert {n: s for n, s in sizes.items() if s > LIMIT} == {}


def test_no_project_import_inside_a_function():
    names = set(modules())
    inner = {name: [t for t, at_top in imports(path, names) if not at_top]
             for name, path in modules().items()}
    assert {n: t for n, t in inner.items() if t} == {}


def test_no_import_cycle():
    names = set(modules())
    graph = {name: {t for t, _ in imports(path, names)} - {name}
             for name, path in modules().items()}
    state = {}

    def visit(n, trail):
        if state.get(n) == "done":
            return None
        if state.get(n) == "open":
            return trail[trail.index(n):] + [n]
        state[n] = "open"
        for m in sorted(graph[n]):
            cycle = visit(m, trail + [n])
            if cycle:
                return cycle
        state[n] = "done"
        return None

    cycles = [c for n in sorted(graph) if (c := visit(n, []))]
    assert cycles == []


def test_no_line_is_wider_than_100_columns():
    """Every Python file of the project (scripts, packages, tests, bench, data, config)."""
    wide = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith((".", "__", "out"))]
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                with open(path, encoding="utf-8") as fh:
                    n = sum(len(line.rstrip("\n")) > WIDTH for line in fh)
                if n:
                    wide[os.path.relpath(path, ROOT)] = n
    assert wide == {}
