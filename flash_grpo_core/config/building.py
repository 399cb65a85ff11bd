"""Building a section dataclass from its parsed mapping: unknown keys and wrong types are refused with
the offending key path (the values themselves are checked by each dataclass)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from flash_grpo_core.config.checks import ConfigError, _check


def build_section(cls, data: Any, where: str):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    _check(isinstance(data, dict), f"{where or 'params'} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    _check(not unknown, f"unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}; "
                        f"known keys{' of ' + where if where else ''}: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}".lstrip(".")) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise ConfigError(f"{where or 'params'}: {error}") from error


def _coerce(hint, value: Any, where: str):
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(next(a for a in args if a is not type(None)), value, where)
    if origin is tuple and args[-1] is Ellipsis:
        _check(isinstance(value, (list, tuple)), f"{where} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is tuple:
        _check(isinstance(value, (list, tuple)) and len(value) == len(args),
               f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin is dict:
        _check(isinstance(value, dict), f"{where} must be a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool),
               f"{where} must be a number, got {value!r}")
        _check(math.isfinite(value), f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is bool or hint is int:
        _check(type(value) is hint, f"{where} must be {'true/false' if hint is bool else 'an integer'}, got {value!r}")
        return value
    if hint is str:
        _check(isinstance(value, str), f"{where} must be a string, got {value!r}")
    return value
