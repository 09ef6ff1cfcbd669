"""The architecture, checked: each package imports only the packages below it (README, "Code layout").

Read from the source with `ast`, so a new import that breaks the layering fails here,
before it becomes a cycle or pulls FUSE into the engine.
"""

import ast
import pathlib

import pytest

import cowfs

ROOT = pathlib.Path(cowfs.__file__).parent
FOUNDATIONS = {"errors", "mounttable", "runtime", "formatting"}
# package -> the packages it may import, besides itself and the shared foundations
ALLOWED = {
    "overlay": set(),
    "daemon": {"overlay"},
    "images": {"overlay"},
    "explore": {"overlay", "daemon", "images"},
    "cli": {"overlay", "daemon", "images", "explore"},
    "testing": {"overlay"},
}


def _imported_packages(path):
    """The first component under `cowfs` of every cowfs module `path` imports (absolute or relative)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's own package
                package = list(path.relative_to(ROOT.parent).parts[:-1])
                base = package[: len(package) - node.level + 1]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
            if names == ["cowfs"]:
                names = ["cowfs." + alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "cowfs" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_layers_below(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imported_packages(path) - ALLOWED[package] - FOUNDATIONS - {package, "__version__"}
        if bad:
            wrong[str(path.relative_to(ROOT.parent))] = sorted(bad)
    assert not wrong, f"imports against the layering: {wrong}"


def test_foundations_import_no_package():
    for name in FOUNDATIONS:
        bad = _imported_packages(ROOT / f"{name}.py") - FOUNDATIONS
        assert not bad, f"cowfs/{name}.py imports {sorted(bad)}"


def test_engine_has_no_fuse_import():
    """ctypes is allowed (renameat2); a FUSE binding is not."""
    for path in (ROOT / "overlay").rglob("*.py"):
        tree = ast.parse(path.read_text())
        modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in modules if m.split(".")[0] in ("mfusepy", "fuse", "pyfuse3")}, path


def test_every_module_says_what_it_owns():
    missing = [str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
               if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, f"modules without a first docstring line: {missing}"


def test_every_equivalent_mutant_names_a_line_of_the_code():
    """An equivalent mutant listed for `make mutate` names a function that exists and a line it holds:
    an entry left behind by a change to the code fails here, without a mutation run."""
    import importlib.util

    script = ROOT.parent / "scripts" / "mutation_report.py"
    spec = importlib.util.spec_from_file_location("mutation_report", script)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    entries = report.read_equivalents()
    assert len(entries) > 100
    missing = []
    for path, where, old, new in entries:
        source = (ROOT.parent / path).read_text()
        cls, _, name = where.rpartition(".")
        span = report.function_lines(ast.parse(source), cls or None, name)
        lines = source.splitlines()[span[0] - 1:span[1]] if span else []
        if old == new or old not in {line.strip() for line in lines}:
            missing.append(f"{path}: {where}: {old!r}")
    assert missing == []
