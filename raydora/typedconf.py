"""Frozen dataclasses from nested mappings (YAML) with dotted overrides, checked against their annotations.

Generic: nothing here knows raydora's sections (``raydora.config`` declares them). Every error is a
:class:`ConfigError` naming the dotted key at fault. Pure: stdlib and PyYAML only.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import inspect
import itertools
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the dotted key at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
        self.message = message

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        # Copied and pickled with both arguments (Ray Tune copies a trial's exception; Ray pickles it to the driver).
        return (type(self), (self.key, self.message))


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting lists to tuples, ints to floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping (section), got {type(value).__name__}")
        return build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(key, f"expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"must be finite, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported field type {tp!r}")  # a bug in a config class, not in the YAML


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from ``data``, every value checked against its annotation; unknown keys
    and the class's own checks raise :class:`ConfigError` with the dotted key (``prefix`` + the field)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(dotted, f"unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if prefix and not e.key.startswith(prefix + "."):
            raise ConfigError(f"{prefix}.{e.key}", str(e).split(": ", 1)[-1]) from None
        raise


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``["train.lam=0.5", "name=x"]`` to a nested mapping (a copy). Values are parsed as YAML
    (``0.5``, ``true``, ``null``, ``[a, b]``, ``{a: 1}``); a value replaces whatever was at its key."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(key or item, f"override {item!r} must look like section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse value {raw!r}: {e}") from None
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(key, f"{part!r} is a value, not a section")
            node = child
        node[leaf] = value
    return out


def from_mapping(cls: type, data: Mapping[str, Any], overrides: Iterable[str] = ()) -> Any:
    """An instance of the dataclass ``cls`` from a nested mapping plus dotted overrides."""
    if not isinstance(data, Mapping):
        raise ConfigError("", f"a config must be a mapping of sections, got {type(data).__name__}")
    return build(cls, apply_overrides(data, overrides))


def load_yaml(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Load a YAML file (or ``cls``'s defaults when ``path`` is None) into ``cls`` with dotted overrides; an error
    says whether the bad value came from an override or from the file."""
    data: Any = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError("", f"{path}: not valid YAML: {e}") from None
    overrides = list(overrides)
    try:
        return from_mapping(cls, data, overrides)
    except ConfigError as e:
        given = {item.partition("=")[0].strip(): item for item in overrides}
        if e.key in given:  # the bad value came from the command line, not the file
            raise ConfigError(e.key, f"{str(e).split(': ', 1)[-1]} (from the override {given[e.key]!r})") from None
        if path is not None:
            raise ConfigError(e.key, f"{str(e).split(': ', 1)[-1]} (in {path})") from None
        raise


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that ``from_dict`` reads back to an equal config."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string literal under each field): ``{field: doc}``."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """``[(dotted key, default, doc)]`` for every leaf field, recursively."""
    rows = []
    docs = field_docs(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        value = getattr(default, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            rows.extend(explain(type(value), key + "."))
        else:
            shown = json.dumps(list(value) if isinstance(value, tuple) else value)
            rows.append((key, shown, docs.get(f.name, "")))
    return rows
