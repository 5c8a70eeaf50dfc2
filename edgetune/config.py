"""Frozen-dataclass settings, read from YAML with CLI flag overrides, saved with every run.

One list of fields is the single source: each settings class is a frozen dataclass whose
fields carry an attribute docstring (the string literal right under the field). From it come

- the CLI flags (``add_flags``): ``--field-name`` per field, typed by the annotation, with the
  docstring as help; ``bool`` fields get ``--x/--no-x``, ``Literal`` fields list their
  choices, tuples take one or more values;
- the YAML keys (``load_config``): values are coerced to the field's type (YAML 1.1 reads
  ``2e-4`` as a string; here it becomes 0.0002) and a bad value or unknown key is a
  ``ConfigError`` naming the file, the key and what was expected.

Precedence: the dataclass defaults < the ``--config`` YAML file < the flags given.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union

import yaml

from .errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # the config classes are dataclasses
_NONE = type(None)


# ---- the fields of a settings class --------------------------------------------------------


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring, whitespace collapsed: ``{name: text}``."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (frozen app): flags still work, without help
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@dataclasses.dataclass(frozen=True)
class FieldType:
    """What a field accepts, read from its annotation."""

    base: type
    """The scalar type: bool, int, float, str (or another str-constructible class)."""
    optional: bool = False
    """None is allowed (``X | None``)."""
    choices: tuple | None = None
    """The allowed values of a ``Literal[...]``."""
    sequence: type | None = None
    """tuple or list when the field holds several values of ``base``."""

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        else:
            text = {
                bool: "true or false",
                int: "an integer",
                float: "a number",
                str: "a string",
            }.get(self.base, self.base.__name__)
        if self.sequence:
            text = f"a list of {text}"
        return text + (" or null" if self.optional else "")


def _field_type(hint: Any) -> FieldType:
    optional = False
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not _NONE]
        optional = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"unsupported settings annotation {hint!r}")
        hint, origin = args[0], typing.get_origin(args[0])
    sequence = None
    if origin in (tuple, list):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(set(args)) > 1:
            raise TypeError(f"unsupported settings annotation {hint!r}")
        sequence = origin
        hint = args[0] if args else str
        origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        return FieldType(type(choices[0]), optional, choices, sequence)
    return FieldType(hint, optional, None, sequence)


@functools.cache
def field_types(cls: type) -> dict[str, FieldType]:
    hints = typing.get_type_hints(cls)
    return {f.name: _field_type(hints[f.name]) for f in dataclasses.fields(cls)}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


# ---- coercion ---------------------------------------------------------------------------------

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _scalar(value: Any, ft: FieldType) -> Any:
    """``value`` as ``ft.base``; ValueError when it is not one."""
    if ft.base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError
    if isinstance(value, bool) or isinstance(value, (list, tuple, dict)):
        raise ValueError  # True is an int to Python, never a number to a user
    if ft.base is int:
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                value = float(value)  # "1e3": YAML 1.1 and argparse both hand over a string
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if ft.base is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value)
        raise ValueError
    if ft.base is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise ValueError
    return value if isinstance(value, ft.base) else ft.base(value)


def coerce(label: str, value: Any, ft: FieldType) -> Any:
    """``value`` (from YAML, a flag or code) as the field's type; a ConfigError starts with
    ``label`` (the flag, or the file and key)."""
    if value is None:
        if ft.optional:
            return None
        raise ConfigError(f"{label}: expected {ft.describe()}, got null")
    if ft.sequence:
        items = value if isinstance(value, (list, tuple)) else [value]
        one = dataclasses.replace(ft, sequence=None, optional=False)
        return ft.sequence(coerce(label, v, one) for v in items)
    try:
        out = _scalar(value, ft)
    except (ValueError, TypeError):
        raise ConfigError(f"{label}: expected {ft.describe()}, got {value!r}") from None
    if ft.choices is not None and out not in ft.choices:
        close = difflib.get_close_matches(str(out), [str(c) for c in ft.choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{label} must be one of {', '.join(map(str, ft.choices))}, got {out!r}{hint}"
        )
    return out


def closest_key(cls: type, key: str) -> str | None:
    """The field an unknown ``key`` most likely meant: the nearest name by spelling, else the
    first field whose docstring says it in words (``learning_rate`` -> ``lr``)."""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    if close:
        return close[0]
    words = key.replace("_", " ").lower()
    if len(words) >= 4:
        for name, doc in field_docs(cls).items():
            if words in doc.lower():
                return name
    return None


# ---- loading and saving -----------------------------------------------------------------------


def read_yaml(cls: type, yaml_path: str | os.PathLike) -> dict[str, Any]:
    """The settings in a YAML file, checked and coerced against ``cls``'s fields."""
    path = Path(yaml_path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    types_ = field_types(cls)
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            near = closest_key(cls, name)
            hint = f"did you mean '{near}'?" if near else f"known: {', '.join(types_)}"
            raise ConfigError(f"{path}: unknown setting '{key}' ({hint})")
        values[name] = coerce(f"{path}: {name}", value, types_[name])
    return values


def load_config(
    cls: type[T],
    yaml_path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
) -> T:
    """Build ``cls`` from its defaults, updated by a YAML file (optional), updated by the
    non-None ``overrides`` (flags or code; coerced like YAML values)."""
    types_ = field_types(cls)
    values = read_yaml(cls, yaml_path) if yaml_path else {}
    for key, value in (overrides or {}).items():
        if key not in types_:
            raise TypeError(f"{cls.__name__} has no field {key!r}")  # a bug, not user input
        if value is not None:
            values[key] = coerce(key, value, types_[key])
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and _default(f) is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"missing required setting(s): {', '.join(missing)} (flags "
            f"{', '.join(flag_name(n) for n in missing)} or keys in --config)"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    def plain(v: Any) -> Any:
        return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v

    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (what actually ran, defaults included)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


# ---- shipped recipes ----------------------------------------------------------------------------


def configs_dir() -> Path:
    """Where the shipped recipes are: ``examples/configs`` in a checkout (an editable install
    too), ``edgetune/configs`` in an installed wheel (pyproject.toml maps one onto the other)."""
    here = Path(__file__).resolve().parent
    for d in (here / "configs", here.parent / "examples" / "configs"):
        if d.is_dir():
            return d
    raise ConfigError(
        f"no shipped configs found (looked in {here / 'configs'} and "
        f"{here.parent / 'examples' / 'configs'}); reinstall edgetune"
    )


def shipped_config(name: str | os.PathLike) -> Path:
    """A recipe by name (``tiny-phi3_qlora_cpu``, ``.yaml`` optional) or by path."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    stem = path.name.removesuffix(".yaml")
    found = configs_dir() / f"{stem}.yaml"
    if not found.is_file():
        names = sorted(p.stem for p in configs_dir().glob("*.yaml"))
        near = difflib.get_close_matches(stem, names, n=1)
        hint = f"did you mean '{near[0]}'?" if near else f"shipped: {', '.join(names)}"
        raise ConfigError(f"{name}: no such config file or shipped recipe ({hint})")
    return found


# ---- CLI flags --------------------------------------------------------------------------------


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_help(cls: type, name: str) -> str:
    """A field's flag help: its docstring and its default."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    default = _default(f)
    if default is dataclasses.MISSING:
        tail = " (required)"
    elif default is None or default == ():
        tail = ""  # unset: the docstring says what that means
    else:
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        tail = f" (default: {shown})"
    return (field_docs(cls).get(name, "") + tail).strip().replace("%", "%%")


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    groups: dict[str, tuple[str, Sequence[str]]] | None = None,
    exclusive: Iterable[Sequence[str]] = (),
    config_flag: bool = True,
    skip: Iterable[str] = (),
) -> None:
    """Add a flag for every field of ``cls`` to ``parser`` (but those in ``skip``, which the
    caller adds itself, e.g. as positionals with the field's name as dest).

    Every flag defaults to None, so only the flags given override the YAML and the
    defaults; values stay as typed and are coerced in ``config_from_args``, where a bad one
    is a one-line ConfigError. ``groups`` maps a help-section title to (description, field
    names); ``exclusive`` lists sets of fields that may not be given together.
    """
    if config_flag:
        parser.add_argument(
            "--config",
            metavar="YAML",
            help="YAML file of the settings below (keys: the flag names with "
            "_ for -); the flags given override it",
        )
    where: dict[str, Any] = {}
    for title, (description, names) in (groups or {}).items():
        g = parser.add_argument_group(title, description)
        where.update(dict.fromkeys(names, g))
    for names in exclusive:
        g = where.get(names[0], parser).add_mutually_exclusive_group()
        where.update(dict.fromkeys(names, g))
    skipped = set(skip)
    for name, ft in field_types(cls).items():
        if name in skipped:
            continue
        kw: dict[str, Any] = dict(dest=name, default=None, help=field_help(cls, name))
        if ft.base is bool and not ft.sequence:
            kw["action"] = argparse.BooleanOptionalAction
        elif ft.sequence:
            kw.update(action="extend", nargs="+")
        if ft.choices is not None and ft.base is not bool:
            # no argparse choices: a bad value is a one-line ConfigError, as from YAML
            kw["metavar"] = "{" + ",".join(map(str, ft.choices)) + "}"
        where.get(name, parser).add_argument(flag_name(name), **kw)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """``cls`` from its defaults < ``args.config`` (a YAML file) < the flags given."""
    given = {
        name: coerce(flag_name(name), getattr(args, name), ft)
        for name, ft in field_types(cls).items()
        if getattr(args, name, None) is not None
    }
    return load_config(cls, getattr(args, "config", None), given)
