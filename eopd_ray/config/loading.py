"""Loading a config: YAML files plus dotted overrides, every problem reported at once.

    cfg = load_config("jobs/configs/tiny.yaml", ["loss.entropy_threshold=0.5"])
    text = config_to_yaml(cfg)  # the resolved config, reloadable

YAML files hold only what they change. Dotted overrides (`section.key=value`) are parsed as YAML
scalars. Every problem found — unknown keys (with a "did you mean"), wrong types, out-of-range
values and cross-field violations — is reported at once in one `ConfigError` naming each key
path. The resolved config written by `config_to_yaml` reloads to an equal config.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from eopd_ray.config.rules import cross_field_issues
from eopd_ray.config.schema import Config
from eopd_ray.config.strict_yaml import parse_yaml, read_yaml_tree
from eopd_ray.errors import ConfigError, ConfigIssue

_ADAPTER = TypeAdapter(Config)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _section_type(cls: type, name: str) -> type | None:
    """The dataclass type of section `name` of `cls`, or None when it is a leaf value.
    Sections are exactly the fields whose default factory is a dataclass."""
    for f in dataclasses.fields(cls):
        if f.name == name and dataclasses.is_dataclass(f.default_factory):
            return f.default_factory  # type: ignore[return-value]
    return None


def _all_leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    paths = []
    for name in _field_names(cls):
        sub = _section_type(cls, name)
        paths += _all_leaf_paths(sub, f"{prefix}{name}.") if sub else [f"{prefix}{name}"]
    return paths


def _suggest(path: str, key: str, siblings: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{path.rpartition('.')[0] + '.' if '.' in path else ''}{close[0]}'?"
    elsewhere = [p for p in _all_leaf_paths() if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean '{elsewhere[0]}'?"
    return f"; valid keys here: {', '.join(siblings)}"


# Keys that existed once, with what to do instead (so an old file is told why, not "did you mean").
_REMOVED_KEYS = {
    "teacher.engine": "removed: the teacher always runs the transformers forward with an fp32 LM "
    "head (exact full-vocabulary entropy); delete the key",
}


def _unknown_key(path: str, key: str, siblings: Sequence[str], what: str = "unknown key") -> str:
    return _REMOVED_KEYS.get(path) or what + _suggest(path, key, siblings)


def _drop_unknown_keys(data: Any, cls: type, prefix: str, issues: list[ConfigIssue]) -> Any:
    """Copy of `data` without keys `cls` does not have, recording each with a suggestion."""
    if not isinstance(data, Mapping):
        return data  # a type error pydantic will report with its path
    names = _field_names(cls)
    kept: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            issues.append(ConfigIssue(path, _unknown_key(path, str(key), names)))
            continue
        sub = _section_type(cls, key)
        kept[key] = _drop_unknown_keys(value, sub, f"{path}.", issues) if sub else value
    return kept


def _apply_override(data: dict[str, Any], override: str, issues: list[ConfigIssue]) -> None:
    path, sep, raw = override.partition("=")
    path = path.strip()
    if not sep or not path:
        issues.append(ConfigIssue(path, f"override {override!r} is not of the form key.path=value"))
        return
    try:
        value = parse_yaml(raw, f"override {path}") if raw.strip() else ""
    except ConfigError as exc:
        issues.append(ConfigIssue(path, f"cannot parse value {raw!r}: {exc.issues[0].message}"))
        return
    node, cls = data, Config
    keys = path.split(".")
    for depth, key in enumerate(keys):
        here = ".".join(keys[: depth + 1])
        names = _field_names(cls)
        if key not in names:
            issues.append(
                ConfigIssue(here, _unknown_key(here, key, names, "unknown key in override"))
            )
            return
        sub = _section_type(cls, key)
        if depth == len(keys) - 1:
            node[key] = value
        elif sub is None:
            issues.append(ConfigIssue(here, f"is a value, not a section: cannot set {path}"))
            return
        else:
            child = node.get(key)
            node[key] = child = dict(child) if isinstance(child, Mapping) else {}
            node, cls = child, sub


def _error_path(loc: tuple[Any, ...]) -> str:
    """The config key path of a pydantic error location (drops union/constraint tags)."""
    parts, cls = [], Config
    for item in loc:
        if cls is None or not isinstance(item, str) or item not in _field_names(cls):
            break
        parts.append(item)
        cls = _section_type(cls, item)
    return ".".join(parts)


def _without_path(data: dict[str, Any], path: str) -> None:
    *head, last = path.split(".")
    node: Any = data
    for key in head:
        node = node.get(key) if isinstance(node, Mapping) else None
    if isinstance(node, dict):
        node.pop(last, None)


def config_from_dict(
    data: Mapping[str, Any] | None, overrides: Sequence[str] = (), source: str = ""
) -> Config:
    """Validate a nested mapping plus dotted overrides into a `Config`; raise one `ConfigError`."""
    issues: list[ConfigIssue] = []
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError([ConfigIssue("", "the top level must be a mapping of sections")], source)
    tree: dict[str, Any] = _drop_unknown_keys(data, Config, "", issues)
    tree = _deep_copy(tree)
    for override in overrides:
        _apply_override(tree, override, issues)
    try:
        cfg = _ADAPTER.validate_python(tree)
        bad_paths: set[str] = set()
    except ValidationError as exc:
        bad_paths = set()
        for err in exc.errors():
            path = _error_path(err["loc"])
            bad_paths.add(path)
            issues.append(ConfigIssue(path, f"{err['msg']} (got {err['input']!r})"))
        # Fall back to defaults at the bad keys so that cross-field rules can still be checked.
        for path in bad_paths:
            if path:
                _without_path(tree, path)
        try:
            cfg = _ADAPTER.validate_python(tree)
        except ValidationError:
            raise ConfigError(issues, source) from None
    issues += cross_field_issues(cfg, skip=bad_paths)
    if issues:
        raise ConfigError(issues, source)
    return cfg


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (None: all defaults), apply dotted overrides, validate."""
    if path is None:
        return config_from_dict({}, overrides, "<defaults>")
    path = Path(path)
    return config_from_dict(read_yaml_tree(path), overrides, str(path))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML; `load_config` of it gives an equal `Config`."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
