"""Typed config sections: a dataclass per section whose fields carry their allowed values, and one checker for all.

`build(Section, given, "model")` turns a mapping (a composed Hydra group) into a checked ``Section``: unknown keys,
wrong types and out-of-range values raise ``ConfigError`` naming the key, the value given, what is allowed and the
override that fixes it. Cross-field rules live in a section's ``check()`` method, which calls ``fail``.
Integers must be integers (2.5 is not a rank), floats must be finite numbers, booleans must be booleans.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Mapping, Union

MISSING = dataclasses.MISSING
UNIONS = (Union, types.UnionType)


class ConfigError(ValueError):
    """A setting that cannot run; raised before any model, tokenizer or data file is read."""


def option(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, choices: tuple | None = None, integral_above: float | None = None,
           factory: Any = None) -> Any:
    """A dataclass field with its allowed values. ``integral_above``: values >= it must be whole numbers (e.g. a
    warmup that is a fraction below 1 or a number of steps)."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, integral_above=integral_above).items()
            if v is not None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fail(key: str, value: Any, allowed: str, fix: str | None = None) -> typing.NoReturn:
    fix = fix or f"++{key}=<value>"
    raise ConfigError(f"{key} = {value!r}: {allowed} (set it with {fix})")


def build(cls: type, given: Mapping | None, prefix: str, what: str | None = None):
    """A checked instance of the dataclass ``cls`` from ``given`` (missing keys take the field defaults)."""
    given = dict(given or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
        owner = f"{prefix} ({what})" if what else prefix
        raise ConfigError(f"unknown key {prefix}.{key} = {given[key]!r}: {owner} has {sorted(fields)}{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in given:
            values[name] = check_value(key, given[name], hints[name], f.metadata)
        elif f.default is MISSING and f.default_factory is MISSING:
            fail(key, None, f"a value is required ({describe(hints[name], f.metadata)})")
    obj = cls(**values)
    if hasattr(obj, "check"):
        obj.check(prefix)
    return obj


# ---- values ---------------------------------------------------------------------------------------------------------
def check_value(key: str, value: Any, hint: Any, meta: Mapping = {}) -> Any:
    try:
        out = _coerce(value, hint, key)
    except _Mismatch:
        fail(key, value, f"must be {describe(hint, meta)}")
    if out is None or isinstance(out, (bool, list)):
        return out
    if "choices" in meta and out not in meta["choices"]:
        fail(key, value, f"allowed: {list(meta['choices'])}")
    if isinstance(out, (int, float)):
        for op, bound, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                              ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
            if op in meta and not ok(out, meta[op]):
                fail(key, value, f"must be {describe(hint, meta)}")
        if "integral_above" in meta and out >= meta["integral_above"] and out != int(out):
            fail(key, value, f"must be {describe(hint, meta)}")
    return out


class _Mismatch(Exception):
    pass


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if hasattr(value, "_content") or type(value).__name__ in ("DictConfig", "ListConfig"):
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in UNIONS:
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, a, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args and type(value) is type(args[args.index(value)]):
            return value
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item, f"{key}[{i}]"))
            except _Mismatch:
                fail(f"{key}[{i}]", v, f"must be {describe(item, {})}")
        return out
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value == int(value):
            return int(value)
        raise _Mismatch
    if hint is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(hint):  # a nested section: checked by its own build
        return value
    raise TypeError(f"schema of {key}: unsupported type {hint!r}")


def describe(hint: Any, meta: Mapping) -> str:
    """What a field allows, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if "choices" in meta:
        return f"one of {list(meta['choices'])}"
    if origin in UNIONS:
        parts = [describe(a, meta) for a in args if a is not type(None)]
        text = " or ".join(parts)
        return text + (" or null" if type(None) in args else "")
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (list, tuple):
        return f"a list of {describe(args[0], {}) if args else 'values'}"
    words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
    bounds = [f"{sym} {meta[op]}" for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if op in meta]
    if bounds and hint in (int, float):
        words += " " + " and ".join(bounds)
    if "integral_above" in meta:
        words += f" (a whole number when >= {meta['integral_above']})"
    return words


def defaults_of(cls: type) -> dict[str, Any]:
    """The field defaults of a section (what a yaml file of it should hold)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out
