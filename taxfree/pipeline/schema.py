"""Typed config -> dataclass conversion with one-line, file-and-key errors.

The YAML is parsed into the dataclasses of `taxfree.pipeline.config`; every mistake is reported
as `<file>: <dotted.key>: <why>` before any work starts, with the nearest valid key for typos.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from taxfree.errors import ConfigError, nearest


class SectionError(ConfigError):
    """Raised by a section's `check()` with a key relative to that section."""


def require(cond: bool, key: str, why: str) -> None:
    """In a section's `check()`: `key: why` unless `cond`."""
    if not cond:
        raise SectionError(f"{key}: {why}")


def check_params(section, params) -> None:
    """Every declared Param (taxfree.params) of a section holds an acceptable value."""
    for p in params:
        why = p.problem(getattr(section, p.name))
        require(why is None, p.name, why)


def param_fields(params) -> list[tuple]:
    """dataclasses.make_dataclass fields for declared Params, in order."""
    return [(p.name, p.type, dataclasses.field(default=p.default, metadata={"help": p.help})) for p in params]


def _type_name(tp) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp) if a is not type(None)) + " or null"
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def convert(value: Any, tp, where: str, source: str):
    """Check `value` against type `tp` and build dataclasses; raise ConfigError naming `where`."""

    def fail(why: str):
        raise ConfigError(f"{source}: {where}: {why}")

    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(value, arg, where, source)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        fail(f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            fail(f"{value!r} is not one of {', '.join(map(str, choices))}{nearest(value, choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, where, source)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            fail(f"expected {_type_name(tp)}, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                fail(f"expected {len(args)} values, got {len(value)}")
            return tuple(convert(v, a, f"{where}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [convert(v, item, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            fail(f"expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {convert(k, kt, where, source): convert(v, vt, f"{where}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            fail(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            fail(f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads 1e-6 (no dot) as a string: accept numeric strings.
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            fail(f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            fail(f"expected a string, got {value!r}")
        return value
    return value


def build_dataclass(cls, data: dict, where: str, source: str):
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{source}: {path}: unknown key{nearest(key, fields)}")
        kwargs[key] = convert(value, hints[key], path, source)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except SectionError as e:
            # check() raises with a key relative to this section.
            raise ConfigError(f"{source}: {where + '.' if where else ''}{e}") from None
    return obj


def to_dict(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


__all__ = ["convert", "build_dataclass", "to_dict", "require", "check_params", "param_fields", "SectionError"]
