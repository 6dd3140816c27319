"""Validated plugin configuration, read from vLLM's own config surface.

Both plugins are configured through ``--additional-config`` (``LLM(additional_config=...)``)
under their own key, ``"dwdp"`` or ``"flextensor"``. Every field can also be set by an
environment variable ``<PREFIX><FIELD>`` (``VLLM_DWDP_RANK=1``), which wins over the JSON:
that is how per-process values reach worker processes and Ray workers that vLLM's config
cannot address one by one.

A config class is a frozen dataclass whose fields carry their own check in
``metadata["check"]``: a function returning an error text (what is allowed) or None.
Unknown keys, wrong types and failed checks raise one :class:`PluginConfigError` that names
the dotted key, the value received and what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class PluginConfigError(ValueError):
    """A plugin setting is wrong. The message says which key, what was given, what is allowed."""


def setting(default: Any, doc: str, check: Callable[[Any], str | None] | None = None):
    """Declare one config field: its default, a one-line doc and an optional check."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"doc": doc, "check": check}
        )
    return dataclasses.field(default=default, metadata={"doc": doc, "check": check})


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert ``value`` to ``annotation``; env values arrive as strings."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except PluginConfigError as e:
                errors.append(str(e))
        raise PluginConfigError(errors[-1])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise PluginConfigError(f"{where} must be true or false, got {_describe(value)}")
    if annotation is int:
        if isinstance(value, bool):
            raise PluginConfigError(f"{where} must be an integer, got {_describe(value)}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise PluginConfigError(f"{where} must be an integer, got {_describe(value)}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise PluginConfigError(f"{where} must be a number, got {_describe(value)}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise PluginConfigError(f"{where} must be a string, got {_describe(value)}")
    if origin is list:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise PluginConfigError(
                    f"{where} must be a JSON list, got {_describe(value)}"
                ) from None
        if not isinstance(value, (list, tuple)):
            raise PluginConfigError(f"{where} must be a list, got {_describe(value)}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is typing.Any:
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {where}")


def parse_section(cls: type[T], section: str, raw: Any, env_prefix: str,
                  environ: Mapping[str, str] | None = None) -> T:
    """Build ``cls`` from ``additional_config[section]`` plus ``env_prefix*`` overrides.

    ``raw`` may be None (section absent), a dict, or an already-parsed ``cls``.
    """
    if isinstance(raw, cls):
        return raw
    environ = os.environ if environ is None else environ
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise PluginConfigError(
            f'additional_config.{section} must be a JSON object such as {{"enabled": true}}, '
            f"got {_describe(raw)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise PluginConfigError(
            f"Unknown additional_config.{section} keys: {unknown}. "
            f"Allowed keys: {sorted(fields)}"
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        env_name = env_prefix + name.upper()
        if env_name in environ:
            value, where = environ[env_name], f"environment variable {env_name}"
        elif name in raw:
            value, where = raw[name], f"additional_config.{section}.{name}"
        else:
            continue
        value = _coerce(value, hints[name], where)
        check = f.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise PluginConfigError(f"{where} {problem}, got {_describe(value)}")
        values[name] = value
    try:
        return cls(**values)
    except PluginConfigError as e:
        raise PluginConfigError(f"additional_config.{section}: {e}") from None


def describe_settings(cls: type, section: str, env_prefix: str, markdown: bool = False) -> str:
    """A table of every setting (key, env var, default, doc), for --help and (``markdown``)
    the README."""
    rows = ([f"`additional_config.{section}` | variable | default | meaning", "|---|---|---|---|"]
            if markdown else [f"additional_config.{section}:"])
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        doc = f.metadata.get("doc", "")
        rows.append(f"| `{f.name}` | `{env_prefix + f.name.upper()}` | `{default!r}` | {doc} |"
                    if markdown else
                    f"  {f.name:<22} {env_prefix + f.name.upper():<34} default {default!r}: {doc}")
    if markdown:
        rows[0] = "| " + rows[0] + " |"
    return "\n".join(rows)


# Reusable checks: each returns an error text or None.
def at_least(lo: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= lo else f"must be >= {lo}"


def within(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {list(choices)}"
