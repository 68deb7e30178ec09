"""Config plumbing shared by every stage: strict YAML/dict -> dataclass, and dataclass -> CLI.

Each stage owns its dataclass (``CacheConfig``, ``TrainConfig``, one per architecture, ...), with a
docstring under every field. The same classes are the YAML recipe schema (:func:`from_dict`, strict:
an unknown key is an error naming the nearest valid key) and the command line (:func:`parse_cli`,
through simple_parsing, whose ``--help`` shows the field docstrings).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sparsedict.util import did_you_mean

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or flag that does not fit the config classes."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, recursing into nested dataclasses; unknown keys raise."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            hint = did_you_mean(key, fields) or "."
            raise ConfigError(
                f"unknown key {where + key!r} for {cls.__name__}{hint} Valid keys: {', '.join(fields)}"
            )
        tp = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{key}.")
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif tp is tuple or typing.get_origin(tp) is tuple:
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}{' at ' + where.rstrip('.') if where else ''}: {err}") from err


def parse_cli(cls: type[T], argv: list[str] | None, prog: str, description: str = "") -> T:
    """Parse flags for dataclass ``cls`` with simple_parsing (field docstrings become ``--help``)."""
    from simple_parsing import ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, add_config_path_arg=False)
    parser.add_arguments(cls, dest="cfg")
    args = parser.parse_args(argv)
    return args.cfg
