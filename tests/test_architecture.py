"""The layout the README promises: a folder per pass, and no import cycle among onnxopt's modules."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = {"onnxopt": ROOT / "onnxopt", "onnxopt.passes": ROOT / "passes"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports at import time (top-level statements, not functions)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                out.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def test_no_import_cycle_among_the_projects_modules():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError(
                    "import cycle: " + " -> ".join([*stack[stack.index(nxt) :], nxt])
                )
            if not state.get(nxt):
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in graph:
        if not state.get(name):
            visit(name, [name])


def test_a_folder_per_pass_and_a_test_folder_for_each():
    import onnxopt

    assert callable(onnxopt.optimize)
    for name in ("fold", "prune", "fuse", "quant", "wquant", "slim", "factorize"):
        assert (ROOT / "passes" / name / "__init__.py").is_file(), name
        assert (ROOT / "tests" / name).is_dir(), name


def test_every_pass_folder_is_packaged():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    for folder in (ROOT / "passes").rglob("__init__.py"):
        parts = folder.parent.relative_to(ROOT / "passes").parts
        name = ".".join(("onnxopt.passes", *parts)).rstrip(".")
        assert name in listed, f"add {name!r} to [tool.setuptools] packages in pyproject.toml"
