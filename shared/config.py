"""Frozen dataclass configs loaded from TOML, overridden by environment and CLI, validated.

A component declares one frozen dataclass; each field's `metadata["help"]` says why it exists and
`metadata.get("check")` is an optional predicate with a message. `load_config` fills it from, in rising
priority: dataclass defaults, a TOML file (top-level table or `[section]`), environment variables
`{PREFIX}{FIELD_UPPER}` and explicit overrides (CLI). Every problem is reported with the key that caused
it, and all problems are collected before raising so a user fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range; `problems` lists each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


def field(default: Any, help: str, check: tuple[Callable[[Any], bool], str] | None = None) -> Any:
    """A dataclass field with a one-line why (`help`) and an optional (predicate, message) check."""
    meta: dict[str, Any] = {"help": help}
    if check is not None:
        meta["check"] = check
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple or a frozen value as a config default")
    return dataclasses.field(default=default, metadata=meta)


def _coerce(name: str, value: Any, typ: Any, from_text: bool) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (from_text and value == ""):
            return None
        if len(args) == 1:
            typ, origin = args[0], typing.get_origin(args[0])
        else:  # float | Literal["auto"]: the first alternative, in declared order, that takes the value
            errors = []
            for alt in args:
                try:
                    return _coerce(name, value, alt, from_text)
                except ValueError as exc:
                    errors.append(exc)
            raise errors[0]  # what the first alternative expected
    if origin is typing.Literal:
        allowed = typing.get_args(typ)
        if value not in allowed:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {type(value).__name__} {value!r}")
        (inner, *_rest) = typing.get_args(typ) or (str,)
        return tuple(_coerce(name, v, inner, from_text) for v in value)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                pass
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if from_text and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if typ is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise ValueError(f"{name}: expected a path, got {value!r}")
    return value


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    *,
    section: str | None = None,
    env_prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    table: tuple[str, Mapping[str, Any]] | None = None,
) -> T:
    """Build `cls` from defaults < TOML file < environment < overrides; raise ConfigError naming each bad key.

    A field whose type is itself a config dataclass is a TOML table of its own (`[policy]`, at the top
    level or inside `[section]`), overridden by `{PREFIX}{FIELD}_{KEY}` and by the override `field.key`.
    `table` = (where, data) loads from an already parsed table instead of `path` (the nested case)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    nested = {k: hints[k] for k in fields if dataclasses.is_dataclass(hints[k])}
    problems: list[str] = []
    values: dict[str, Any] = {}
    subtables: dict[str, Any] = {}

    data: Mapping[str, Any] = {}
    where = ""
    if table is not None:
        where, data = table
    elif path is not None:
        p = Path(path).expanduser()
        where = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config file {p} does not exist"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
        if section is not None and section in data:
            top = data
            data = data[section]
            if not isinstance(data, dict):
                raise ConfigError([f"{p}: [{section}] must be a table"])
            subtables = {k: top[k] for k in nested if k in top}  # [policy] beside [client]
    for key, raw in data.items():
        if key not in fields:
            problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
            continue
        if key in nested:
            subtables[key] = raw
            continue
        try:
            values[key] = _coerce(key, raw, hints[key], from_text=False)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")

    env = os.environ if environ is None else environ
    for key, sub in nested.items():
        raw_table = subtables.get(key, {})
        if not isinstance(raw_table, dict):
            problems.append(f"{where}: [{key}] must be a table")
            continue
        over = overrides or {}
        sub_over = dict(over[key]) if isinstance(over.get(key), Mapping) else {}  # policy={...} (a caller's dict)
        sub_over.update({k.partition(".")[2]: v for k, v in over.items() if k.startswith(f"{key}.")})
        sub_where = f"{where} [{key}]" if where else f"[{key}]"
        sub_env = f"{env_prefix}{key.upper()}_" if env_prefix else None
        try:
            values[key] = load_config(sub, env_prefix=sub_env, overrides=sub_over, environ=env, table=(sub_where, raw_table))
        except ConfigError as exc:  # a check or an override names its key as `policy.key`
            problems += [q if q.startswith((sub_where, sub_env or sub_where)) else f"{key}.{q}" for q in exc.problems]
    if env_prefix:
        for key in fields:
            if key in nested:
                continue
            var = f"{env_prefix}{key.upper()}"
            if var in env:
                try:
                    values[key] = _coerce(var, env[var], hints[key], from_text=True)
                except ValueError as exc:
                    problems.append(str(exc))

    for key, raw in (overrides or {}).items():
        if raw is None or key.partition(".")[0] in nested:
            continue
        if key not in fields:
            problems.append(f"unknown option {key!r}")
            continue
        try:
            values[key] = _coerce(key, raw, hints[key], from_text=isinstance(raw, str))
        except ValueError as exc:
            problems.append(str(exc))

    for key, f in fields.items():
        if key not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: required ({f.metadata.get('help', '')})")
    if problems:
        raise ConfigError(problems)
    for key, val in values.items():
        check = fields[key].metadata.get("check")
        if check is not None and not check[0](val):
            problems.append(f"{key}: {val!r} {check[1]}")
    if problems:
        raise ConfigError(problems)
    obj = cls(**values)
    post = getattr(obj, "validate", None)
    if callable(post):
        extra = post()
        if extra:
            raise ConfigError(list(extra))
    return obj


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """`--set KEY=VALUE` pairs as a dict for `load_config(overrides=...)`."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError([f"--set {pair!r}: expected KEY=VALUE"])
        out[key.strip()] = value
    return out


def type_name(typ: Any) -> str:
    """`str`, `Path | None`, `'nf4' | 'int8'`, `tuple[str, ...]`: how --print-config names a field's type."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(typ))
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(typ))
    if origin is tuple:
        args = typing.get_args(typ)
        inner = ", ".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"tuple[{inner}]"
    if typ is type(None):
        return "None"
    return getattr(typ, "__name__", str(typ).replace("typing.", ""))


def describe(cls: type[Any], table: str = "") -> str:
    """A commented TOML listing of every field, its default and its why: for docs and `--print-config`.
    A nested config dataclass follows as its own table (`[policy]`; `[table.policy]` inside `table`)."""
    hints = typing.get_type_hints(cls)
    lines = []
    subs: list[str] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            name = f"{table}.{f.name}" if table else f.name
            subs.append(f"\n# {f.metadata.get('help', '')}\n[{name}]\n" + describe(hints[f.name], name))
            continue
        lines.append(f"# {f.metadata.get('help', '')}  ({type_name(hints[f.name])})")
        default = f.default
        if isinstance(default, Path):
            default = str(default)
        if default is None:
            lines.append(f"# {f.name} =")
        elif isinstance(default, bool):
            lines.append(f"{f.name} = {'true' if default else 'false'}")
        elif isinstance(default, str):
            lines.append(f'{f.name} = "{default}"')
        elif isinstance(default, tuple):
            lines.append(f"{f.name} = {list(default)!r}".replace("'", '"'))
        else:
            lines.append(f"{f.name} = {default!r}")
    return "\n".join(lines) + "\n" + "".join(subs)
