"""Configuration loading: one frozen dataclass per service, filled from flags and environment.

Each service declares its configuration as a frozen, keyword-only dataclass whose fields carry
``metadata={"help": ...}``. :func:`load` turns the fields into command-line flags
(``max_tokens`` -> ``--max-tokens``) and environment variables (``LLMMESH_MAX_TOKENS``), with the
precedence flag > environment > default. Field types decide the parsing:

- ``int``, ``float``, ``str``; ``bool`` accepts ``--x``/``--no-x`` and ``1/0/true/false/yes/no``;
- ``timedelta`` accepts ``250ms``, ``5s``, ``2m``, ``1h`` or a bare number of seconds;
- ``tuple[str, ...]`` is a comma-separated list;
- a ``Literal[...]`` of strings is a choice.

This module is the only place the services read their environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, TypeVar

ENV_PREFIX = "LLMMESH_"

T = TypeVar("T")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_duration(text: str) -> timedelta:
    """Parse ``250ms``, ``5s``, ``2m``, ``1h`` or a bare number of seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 250ms, 5s, 2m)")
    return timedelta(seconds=float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def parse_bool(text: str) -> bool:
    """Parse a boolean the way environment variables usually spell one."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"not a boolean: {text!r} (use true or false)")


def parse_list(text: str) -> tuple[str, ...]:
    """Parse a comma-separated list, dropping empty items."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def env_name(field_name: str) -> str:
    """The environment variable for a configuration field."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """The command-line flag for a configuration field."""
    return "--" + field_name.replace("_", "-")


def _parser_for(tp: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    """Return (parse function, choices) for a field type."""
    if typing.get_origin(tp) is typing.Literal:
        choices = tuple(str(c) for c in typing.get_args(tp))
        return str, choices
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _parser_for(inner[0])
    if tp is bool:
        return parse_bool, None
    if tp is timedelta:
        return parse_duration, None
    if tp is int or tp is float or tp is str:
        return typing.cast(Callable[[str], Any], tp), None
    if typing.get_origin(tp) is tuple:
        return parse_list, None
    raise TypeError(f"unsupported configuration type {tp!r}")


def _format_default(value: Any) -> str:
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value) or "(none)"
    if value is None:
        return "(unset)"
    return str(value)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Add one flag per field of the dataclass ``cls`` to ``parser``."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if not field.init or field.metadata.get("flag") is False:
            continue
        parse, choices = _parser_for(hints[field.name])
        default = field.default
        help_text = field.metadata.get("help", "")
        help_text += f" [env {env_name(field.name)}; default {_format_default(default)}]"
        if parse is parse_bool:
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag_name(field.name),
                dest=field.name,
                type=parse,
                choices=choices,
                default=None,
                metavar=field.metadata.get("metavar"),
                help=help_text,
            )


def from_namespace(
    cls: type[T], namespace: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> T:
    """Build ``cls`` from parsed flags, falling back to the environment, then to defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(typing.cast(Any, cls)):
        if not field.init:
            continue
        flag_value = getattr(namespace, field.name, None)
        if flag_value is not None:
            values[field.name] = flag_value
            continue
        env_value = environ.get(env_name(field.name))
        if env_value is not None and field.metadata.get("flag") is not False:
            parse, choices = _parser_for(hints[field.name])
            try:
                parsed = parse(env_value)
            except ValueError as exc:
                raise ConfigError(f"{env_name(field.name)}: {exc}") from None
            if choices is not None and parsed not in choices:
                raise ConfigError(
                    f"{env_name(field.name)}: {env_value!r} is not one of {', '.join(choices)}"
                )
            values[field.name] = parsed
    try:
        return cls(**values)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def load(
    cls: type[T],
    *,
    prog: str,
    description: str,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> T:
    """Parse ``argv`` and ``environ`` into a ``cls``; exits with usage on a bad flag or value."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, cls)
    namespace = parser.parse_args(argv)
    try:
        return from_namespace(cls, namespace, environ)
    except ConfigError as exc:
        parser.error(str(exc))


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the setting."""
