"""The package map of docs/architecture.md, enforced: a package imports only packages of its own
layer or below, the core and the config import no Ray, vLLM or DeepSpeed (not even inside a
function), and nothing in eopd_ray imports jobs/ or tests/.

Imports are read from the source (every `import` statement, also those inside functions), so a
lazy import that breaks the picture fails here even if no test ever runs it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eopd_ray"

# Lowest first. A module may import its own layer and the layers before it.
LAYERS = [
    {"eopd_ray", "eopd_ray.errors", "eopd_ray.env", "eopd_ray.building"},
    {"eopd_ray.config"},
    {"eopd_ray.core"},
    {"eopd_ray.storage"},
    {"eopd_ray.telemetry"},
    {"eopd_ray.evaluation"},
    {"eopd_ray.toy"},
    {"eopd_ray.roles"},
    {"eopd_ray.serving"},
    {"eopd_ray.driver"},
]
ENGINES = {"ray", "vllm", "deepspeed"}
ENGINE_FREE = {
    "eopd_ray",
    "eopd_ray.errors",
    "eopd_ray.env",
    "eopd_ray.building",
    "eopd_ray.config",
    "eopd_ray.core",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit(module: str) -> str:
    """The package a module belongs to in LAYERS: `eopd_ray.core.loss` -> `eopd_ray.core`."""
    for depth in (2, 1):
        name = ".".join(module.split(".")[:depth])
        if any(name in layer for layer in LAYERS):
            return name
    raise AssertionError(f"{module} is in no layer: add its package to LAYERS and the map")


def layer_of(module: str) -> int:
    name = unit(module)
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
            if node.module == "eopd_ray":  # `from eopd_ray import x`: x is a module
                out += [(node.lineno, f"eopd_ray.{alias.name}") for alias in node.names]
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def violations(path: Path, me: str | None = None) -> list[str]:
    """What breaks the map in `path`, read as module `me` (default: its own name)."""
    me = me or module_name(path)
    found = []
    for line, imported in imports_of(path):
        where = f"{path.name}:{line}"
        top = imported.split(".")[0]
        if top in {"jobs", "tests"}:
            found.append(f"{where}: imports {imported} (eopd_ray never imports jobs/ or tests/)")
        elif top == "eopd_ray" and layer_of(imported) > layer_of(me):
            found.append(
                f"{where}: {unit(me)} imports {imported} from a higher layer ({unit(imported)})"
            )
        elif top in ENGINES and unit(me) in ENGINE_FREE:
            found.append(f"{where}: {unit(me)} imports {imported} (the core is engine-free)")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_follow_the_layers(path):
    assert violations(path) == []


def test_the_checker_sees_a_violation(tmp_path):
    """A core module importing the driver lazily, Ray, or jobs/ is caught, each on its line."""
    src = tmp_path / "probe.py"
    src.write_text(
        "def f():\n    from eopd_ray.driver.pipeline import Pipeline\n    import ray\n"
        "    from jobs import distill\n    from eopd_ray.config import Config\n"
    )
    found = violations(src, me="eopd_ray.core.probe")
    assert [v.split(":")[1].split(" ")[0] for v in found] == ["2", "3", "4"], found


def test_every_package_is_on_the_map():
    packages = {module_name(p.parent / "__init__.py") for p in MODULES}
    mapped = set().union(*LAYERS)
    assert packages <= mapped, f"not on the layer map: {sorted(packages - mapped)}"
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [
        p for p in sorted(packages) if p != "eopd_ray" and f"`{p.split('.')[1]}/`" not in doc
    ]
    assert missing == [], f"docs/architecture.md's map does not mention {missing}"
