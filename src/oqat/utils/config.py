"""Validated configuration from YAML/dicts into dataclasses.

``from_dict(Cls, data, "train")`` checks every key against the dataclass fields (unknown keys,
wrong types and missing required values raise ValueError naming the full key path, e.g.
``train.lr: expected a number, got 'fast'``) and builds nested dataclasses recursively.
``apply_overrides`` applies ``--set a.b=value`` strings from the command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from .files import read_text

T = TypeVar("T")

# A decimal number as YAML 1.2 and Python read it (1e-3, -2.5E+4, .5); YAML 1.1 takes 1e-3 for a string.
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
MAX_CONFIG_BYTES = 1 << 20     # a config is a few KB; a larger file is a mistake or an attack
MAX_YAML_NODES = 100_000       # values after expanding aliases: a "billion laughs" file has 10^9


def _expanded_size(node, memo: dict) -> int:
    """Nodes of the YAML document with every alias expanded (aliases share nodes, so memoised)."""
    key = id(node)
    if key not in memo:
        memo[key] = 0  # a recursive alias counts once
        children = node.value if isinstance(node.value, list) else []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        memo[key] = 1 + sum(_expanded_size(c, memo) for c in children)
        if memo[key] > MAX_YAML_NODES:
            raise ValueError(f"more than {MAX_YAML_NODES} values once its aliases (*name) are expanded; refused")
    return memo[key]


def _yaml_error(exc: yaml.YAMLError) -> str:
    """One line: the problem and where (PyYAML's own message spans several lines)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def _describe(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {args}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        _, item_tp = typing.get_args(tp) or (Any, Any)
        return {k: _convert(v, item_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; it is a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, validating keys and types (errors name the key)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValueError(f"{key}: required key is missing")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict/list values suitable for YAML/JSON/checkpoints."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def parse_yaml(text: str, where: str):
    """YAML text as Python data (safe types only, at most MAX_YAML_NODES values with aliases
    expanded), or a one-line ValueError naming `where`."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {})
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: invalid YAML: {_yaml_error(exc)}") from None
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    finally:
        loader.dispose()


def load_yaml(path: str | Path, what: str = "config file", mapping: bool = True) -> Any:
    """A YAML file's data; with `mapping` (configs) an empty file is ``{}`` and anything but a
    mapping at the top level is an error naming the file."""
    data = parse_yaml(read_text(path, what, MAX_CONFIG_BYTES), str(path))
    if not mapping:
        return data
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the {what} must be a mapping at the top level")
    return data


def load_json(path: str | Path, what: str = "JSON file") -> Any:
    """A JSON file's data, or ValueError naming the file."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not part or not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = parse_yaml(raw, f"--set {item!r}")
    return data


__all__ = ["apply_overrides", "from_dict", "load_json", "load_yaml", "parse_yaml", "to_dict"]
