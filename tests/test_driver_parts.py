"""The driver reads part by part: no import cycle inside a package, and no driver class that
uses a `self.<name>` it neither defines nor receives (a mixin reading its host's attributes), or
reaches into another object's private names (jobs/bench/driver_names.py measures both).

Imports are read from the source, also those inside functions or under TYPE_CHECKING: a cycle
a reader must untangle is one whether or not it bites at import time.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "eopd_ray"
sys.path.insert(0, str(REPO / "jobs" / "bench"))
from driver_names import driver_names, module_names  # noqa: E402


def _module(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the eopd_ray modules it imports (a package's own modules only)."""
    modules = {_module(p): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
                found |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def cycles_within_packages(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle among the modules of one package, as the modules around it."""
    found, done = [], set()

    def package(m: str) -> str:
        return m.rsplit(".", 1)[0]

    def visit(m: str, path: list[str]) -> None:
        for nxt in sorted(graph[m]):
            if package(nxt) != package(m) or nxt in done:
                continue
            if nxt in path:
                found.append([*path[path.index(nxt) :], nxt])
            else:
                visit(nxt, [*path, nxt])

    for m in sorted(graph):
        visit(m, [m])
        done.add(m)
    unique = {}
    for cycle in found:  # one entry per cycle, from its smallest module
        ring = cycle[:-1]
        start = ring.index(min(ring))
        unique[tuple(ring[start:] + ring[:start])] = None
    return [[*ring, ring[0]] for ring in unique]


def test_no_import_cycle_inside_a_package():
    found = [cycle[:-1] for cycle in cycles_within_packages(import_graph())]
    assert found == []


def test_the_cycle_check_sees_a_cycle():
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "q.d": {"p.a"}}
    assert cycles_within_packages(graph) == [["p.a", "p.b", "p.c", "p.a"]]


@pytest.mark.parametrize("row", driver_names(), ids=lambda r: r.module)
def test_a_driver_module_uses_only_what_it_defines_or_receives(row):
    assert row.undefined == {} and row.reached == []


def test_the_measure_sees_a_mixin_and_a_reach(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text(
        "class Part:\n"
        "    def __init__(self, other):\n"
        "        self.other = other\n"
        "    def work(self):\n"
        "        self.done = True\n"
        "        return self.other._secret + self.cfg.x + self.work()\n"
    )
    found = module_names(src)
    assert found.undefined == {"Part": ["cfg", "done"]}
    assert found.reached == ["self.other._secret"]
