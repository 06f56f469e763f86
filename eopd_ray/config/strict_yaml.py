"""Strict YAML for config files: duplicate keys refused, `3e-6` read as a float, and `base:`
files merged under the file that names them. Errors are ConfigErrors naming file and line."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from eopd_ray.errors import ConfigError, ConfigIssue


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys and reads `3e-6` as a float
    (plain YAML 1.1 reads it as a string: it wants `3.0e-6`)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep=False):
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates
)
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue("", f"YAML error{where}: {problem}")], source) from None


def deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> Any:
    """A YAML file's mapping, merged over the file its top-level `base:` names (relative to it).
    Lets a variant (e.g. an `opd` twin) state only what differs from its base."""
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError([ConfigIssue("base", f"circular base files: {chain}")], str(path))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            [ConfigIssue("", f"cannot read the config file: {exc.strerror}")], str(path)
        ) from None
    data = parse_yaml(text, str(path))
    if not isinstance(data, Mapping) or "base" not in data:
        return data
    data = dict(data)
    base_name = data.pop("base")
    if not isinstance(base_name, str):
        raise ConfigError([ConfigIssue("base", "must be a path to a YAML file")], str(path))
    base = read_yaml_tree(path.parent / base_name, (*seen, path.resolve()))
    return deep_merge(base if isinstance(base, Mapping) else {}, data)
