"""Config plumbing shared by every stage: strict YAML/dict -> dataclass, and dataclass -> command line.

Each stage owns its dataclass (``CacheConfig``, ``TrainConfig``, one per architecture, ...), with a
docstring under every field. The same classes are the YAML recipe schema (:func:`from_dict`, strict:
an unknown key is an error naming the nearest valid key) and the command line (:class:`FlagParser`,
through simple_parsing, whose ``--help`` shows the field docstrings). Every command parses the same
way: a recipe gives the defaults, then flags override them.

Flag syntax: the fields of a command's own config are ``--field value``; a config held under a name is
``--name.field value`` (``--train.lr 1e-3``, ``--dictionaries.0.k 64``). Dashes and underscores are
interchangeable (``--max-tokens`` = ``--max_tokens``), and a list is either separate words
(``--hookpoints a b``) or one YAML/JSON-style list (``--hookpoints '[a, b]'``). A flag that does not
exist, a bad value or a bad recipe raises :class:`ConfigError` with one line naming the problem.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from simple_parsing import ArgumentParser
from simple_parsing.utils import str2bool
from simple_parsing.wrappers.field_wrapper import ArgumentGenerationMode, DashVariant, NestedMode

from sparsedict.util import did_you_mean

T = TypeVar("T")


class ConfigError(ValueError):
    """A recipe or flag that does not fit the config classes."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
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
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or cls.__name__} must be a mapping of keys, got {data!r}")
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown key {where + key!r} for {cls.__name__}{did_you_mean(key, fields) or '.'} "
                f"Valid keys: {', '.join(fields)}"
            )
        tp = _unwrap_optional(hints[key])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, where=f"{where}{key}.")
        elif tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif (tp is tuple or typing.get_origin(tp) is tuple) and isinstance(value, (list, tuple)):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{cls.__name__}{' at ' + where.rstrip('.') if where else ''}: {err}") from err


_DOC = re.compile(r"^``([^`]+)``[:.]?\s*(.*)$", re.DOTALL)  # "``usage``: description ..."
_TITLE = re.compile(r"^(\w+) \['([^']+)'\]$")  # simple_parsing's argument group titles
_LIST = re.compile(r"^\s*\[")  # a value written as a YAML/JSON list


class FlagParser(ArgumentParser):
    """simple_parsing's parser with one flag syntax for every command (see the module docstring).

    ``add_config(default, name)`` adds the fields of a dataclass (an instance gives the defaults, e.g.
    the recipe's values); :meth:`parse` returns the parsed instances by name. Errors raise
    :class:`ConfigError` (the caller prints one line) instead of printing usage and exiting.
    """

    def __init__(self, prog: str, doc: str = "") -> None:
        m = _DOC.match(doc)
        usage, description = (m[1], m[2]) if m else (None, doc)
        super().__init__(
            prog=prog,
            usage=usage,
            description=" ".join(description.split("\n\n")[0].split()) or None,
            add_config_path_arg=False,
            allow_abbrev=False,
            argument_generation_mode=ArgumentGenerationMode.NESTED,
            nested_mode=NestedMode.WITHOUT_ROOT,
            add_option_string_dash_variants=DashVariant.UNDERSCORE_AND_DASH,
        )
        self._dests: dict[str, str] = {}
        self._shown: set[int] = set()

    def add_config(self, config: Any, name: str, flat: bool = False) -> None:
        """Flags for the dataclass ``config`` (a class, or an instance giving the defaults): ``--name.field``,
        or ``--field`` when ``flat``; :meth:`parse` returns the instance under ``name``."""
        cls = config if isinstance(config, type) else type(config)
        # simple_parsing drops the first component of a destination from the flag (WITHOUT_ROOT).
        dest = name if flat else f"_.{name}"
        self._dests[name] = dest
        self.add_arguments(cls, dest=dest, default=None if isinstance(config, type) else config)

    def parse(self, argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(configs by name, other arguments by dest)`` from ``argv``."""
        try:
            ns = self.parse_args(list(argv))
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:  # a dataclass's __post_init__ refused a flag's value
            flagged = [n for n in self._dests if n and any(a.startswith(f"--{n}.") for a in argv)]
            raise ConfigError(f"{flagged[0]}: {err}" if len(flagged) == 1 else str(err)) from err
        values = vars(ns)
        configs = {name: values.pop(dest) for name, dest in self._dests.items()}
        return configs, values

    def parse_known_args(self, args=None, namespace=None, attempt_to_reorder=False):
        self._preprocessing(args=list(args or []), namespace=namespace)  # adds the dataclass flags
        return super().parse_known_args(self._rewrite(list(args or [])), namespace, attempt_to_reorder)

    def _rewrite(self, args: list[str]) -> list[str]:
        """Values argparse cannot read as they are: a list written as one YAML/JSON list
        (``--hookpoints '[a, b]'``, ``--hookpoints=[a,b]``) becomes separate words, and ``None``/``null``
        for an optional field becomes the bare flag (which simple_parsing reads as None)."""
        out: list[str] = []
        pending = None  # the flag just read, when its value comes next
        for arg in args:
            flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", "")
            action = self._option_string_actions.get(flag) if flag else None
            if action is not None and eq:
                out += [flag, *self._values(action, flag, value)]
                pending = None
            elif pending is not None and not arg.startswith("-"):
                out += self._values(pending, out[-1], arg)
                pending = None
            else:
                out.append(arg)
                pending = action
        return out

    def _values(self, action, flag: str, value: str) -> list[str]:
        if _is_list(action) and _LIST.match(value):
            try:
                items = yaml.safe_load(value)
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"{flag}: {value!r} is not a list; write it as '[a, b]' or as words"
                ) from err
            return ["None" if v is None else str(v) for v in items]
        if action.nargs == "?" and action.type is not str2bool and value in ("None", "null", "~"):
            return []
        return [value]

    def format_help(self) -> str:
        for group in self._action_groups:  # "CacheConfig ['_.cache']" -> "CacheConfig: --cache.FIELD"
            m = _TITLE.match(group.title or "")
            if m:
                prefix = m[2].partition(".")[2]
                group.title = f"{m[1]}: --{prefix}.FIELD" if prefix else m[1]
                if re.match(rf"^{m[1]}\(.*\)$", group.description or "", re.DOTALL):  # dataclass's auto doc
                    group.description = None
        for action in self._actions:
            if id(action) in self._shown:
                continue
            self._shown.add(id(action))
            if action.help:  # docstrings may hold a literal '%', which argparse would format
                action.help = re.sub(r"%(?!\()", "%%", action.help)
            # simple_parsing negates a bool field `no_x` as --nono_x too: shown, it only confuses
            action.option_strings = [
                o for o in action.option_strings if ".nono" not in o and "--nono" not in o
            ]
        return super().format_help()

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            arg = message.split(": ", 1)[1].split()[0]
            if not arg.startswith("-"):
                raise ConfigError(f"unexpected argument {arg!r} (--help lists the arguments)")
            options = [o for o in self._option_string_actions if o.startswith("--")]
            hint = did_you_mean(arg.split("=")[0], options)
            raise ConfigError(f"unknown flag {arg}{hint} (--help lists them)")
        raise ConfigError(message)


def _is_list(action) -> bool:
    return action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 1)


def parse_cli(cls: type[T], argv: Sequence[str], prog: str, doc: str = "", default: T | None = None) -> T:
    """Flags for dataclass ``cls`` (field docstrings become ``--help``), over ``default`` when given.

    ``doc`` is the command's docstring: a leading ````usage```` span becomes the usage line and the
    rest of its first paragraph the description."""
    parser = FlagParser(prog, doc)
    parser.add_config(default if default is not None else cls, "cfg", flat=True)
    return parser.parse(argv)[0]["cfg"]


def recipe_argument(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split off a leading recipe path (a first argument ending in .yaml/.yml)."""
    if argv and str(argv[0]).endswith((".yaml", ".yml")):
        return str(argv[0]), list(argv[1:])
    return None, list(argv)
