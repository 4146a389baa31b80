"""The packages of `service` form a graph without cycles, counting imports inside functions too.

A deferred import is still a dependency: it only hides the cycle from Python's import machinery, not
from whoever changes one side. Only imports between sub-packages (service.jobs -> service.training)
count; the modules directly under `service` (settings, errors, spec, records, devices, serving_types) sit
below all.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SERVICE = Path(__file__).resolve().parents[2] / "service"
GENERATED = {"gen", "ts_gen"}


def package_of(module: str) -> str | None:
    """`service.jobs.store` -> `jobs`; a module directly under service (or outside it) -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 3 and parts[0] == "service" else None


def imported_modules(source: str, module: str) -> set[str]:
    """Every module `source` imports, anywhere in it (absolute and relative imports)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def package_graph(root: Path = SERVICE) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        relative = path.relative_to(root.parent)
        if GENERATED & set(relative.parts):
            continue
        module = ".".join(relative.with_suffix("").parts)
        mine = package_of(module)
        if mine is None:
            continue
        for target in imported_modules(path.read_text(), module):
            theirs = package_of(target)
            if theirs is not None and theirs != mine and (root / theirs).is_dir():
                edges[mine].add(theirs)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Each cycle once, as the packages along it (depth-first search over a small graph)."""
    found: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for nxt in sorted(edges.get(path[-1], ())):
            if nxt == path[0]:
                start = path.index(min(path))
                found.add(tuple(path[start:] + path[:start]))
            elif nxt not in path and nxt > path[0]:
                walk([*path, nxt])

    for node in sorted(edges):
        walk([node])
    return [list(c) for c in sorted(found)]


def test_no_cycle_between_service_packages_counting_imports_inside_functions() -> None:
    graph = package_graph()
    assert cycles(graph) == [], {k: sorted(v) for k, v in graph.items()}


def test_the_walker_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    (tmp_path / "service" / "a").mkdir(parents=True)
    (tmp_path / "service" / "b").mkdir()
    (tmp_path / "service" / "a" / "x.py").write_text("from service.b.y import f\n")
    (tmp_path / "service" / "b" / "y.py").write_text("def f():\n    from service.a import x\n    return x\n")
    assert cycles(package_graph(tmp_path / "service")) == [["a", "b"]]


def test_the_spec_and_records_import_no_package() -> None:
    for name in ("spec", "records", "devices", "serving_types", "settings", "errors"):
        imported = imported_modules((SERVICE / f"{name}.py").read_text(), f"service.{name}")
        packages = {package_of(m) for m in imported} - {None}
        assert not {p for p in packages if (SERVICE / p).is_dir()}, (name, sorted(imported))
