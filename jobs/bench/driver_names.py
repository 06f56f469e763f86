"""How much of each driver module a newcomer can read on its own: for every eopd_ray/driver/*.py
module, its line count, the `self.<name>` it uses (reads or sets) that its own classes neither
define nor receive (a mixin reading its host's attributes), and the private names it reaches
into on other objects (`other._name`; a library's own, `os._exit`, aside).

    python jobs/bench/driver_names.py [--names] [--out FILE]

A name counts as defined by a class when the class (or a base class in the same module) has it
as a method, a class attribute or a dataclass field, or its constructor (`__init__`,
`__post_init__`) assigns `self.<name>`: constructor arguments are received by being assigned so.
tests/test_driver_parts.py holds the goal: none in either column.
"""

from __future__ import annotations

import argparse
import ast
import json
from dataclasses import dataclass, field
from pathlib import Path

DRIVER = Path(__file__).resolve().parents[2] / "eopd_ray" / "driver"


@dataclass
class ModuleNames:
    module: str
    lines: int
    undefined: dict[str, list[str]] = field(default_factory=dict)  # class -> self.<name>s
    reached: list[str] = field(default_factory=list)  # `expr._private` on another object

    @property
    def num_undefined(self) -> int:
        return sum(len(v) for v in self.undefined.values())


def _self_attrs(node: ast.AST, ctx: type) -> set[str]:
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
        and isinstance(n.ctx, ctx)
    }


def _own_names(cls: ast.ClassDef) -> set[str]:
    names = set()
    for item in cls.body:
        if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(item.name)
        elif isinstance(item, ast.Assign):
            names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
            names.add(item.target.id)
    for item in cls.body:  # what the constructor sets: attributes the class owns
        if isinstance(item, ast.FunctionDef) and item.name in ("__init__", "__post_init__"):
            names |= _self_attrs(item, ast.Store)
    return names


def module_names(path: Path) -> ModuleNames:
    source = path.read_text()
    tree = ast.parse(source, str(path))
    classes = {c.name: c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)}
    own = {name: _own_names(c) for name, c in classes.items()}

    def defined(name: str, seen: frozenset = frozenset()) -> set[str]:
        names = set(own[name])
        for base in classes[name].bases:
            if isinstance(base, ast.Name) and base.id in classes and base.id not in seen:
                names |= defined(base.id, seen | {name})
        return names

    out = ModuleNames(path.stem, len(source.splitlines()))
    for name, cls in classes.items():
        # An attribute set outside the constructor and defined nowhere else is another's.
        used = _self_attrs(cls, ast.Load) | _self_attrs(cls, ast.Store)
        used -= defined(name)
        used = {u for u in used if not (u.startswith("__") and u.endswith("__"))}
        if used:
            out.undefined[name] = sorted(used)
    # A library's private names (os._exit) are that library's business, not another part's.
    modules = {
        (alias.asname or alias.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for alias in n.names
    } | {"ray"}  # also taken from sys.modules where it may not be imported yet
    for n in ast.walk(tree):
        if (
            isinstance(n, ast.Attribute)
            and n.attr.startswith("_")
            and not n.attr.startswith("__")
            and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))
            and ast.unparse(n.value).split(".")[0] not in modules
        ):
            out.reached.append(f"{ast.unparse(n.value)}.{n.attr}")
    out.reached = sorted(set(out.reached))
    return out


def driver_names(driver: Path = DRIVER) -> list[ModuleNames]:
    return [module_names(p) for p in sorted(driver.glob("*.py")) if p.name != "__init__.py"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", action="store_true", help="list the names, not only counts")
    parser.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args()
    rows = driver_names()
    print(f"{'module':<18} {'lines':>5} {'undefined self names':>21} {'reached private':>16}")
    for r in rows:
        print(f"{r.module:<18} {r.lines:>5} {r.num_undefined:>21} {len(r.reached):>16}")
        if args.names:
            for cls, names in r.undefined.items():
                print(f"    {cls}: {', '.join(names)}")
            if r.reached:
                print(f"    reached: {', '.join(r.reached)}")
    total = sum(r.lines for r in rows), sum(r.num_undefined for r in rows)
    print(f"{'total':<18} {total[0]:>5} {total[1]:>21} {sum(len(r.reached) for r in rows):>16}")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                [
                    {
                        "module": r.module,
                        "lines": r.lines,
                        "undefined": r.undefined,
                        "reached": r.reached,
                    }
                    for r in rows
                ],
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
