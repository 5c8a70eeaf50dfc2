"""Frozen-dataclass settings, read from YAML with CLI flag overrides, saved with every run."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


def load_config(cls: type[T], yaml_path: str | os.PathLike | None = None,
                overrides: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from a YAML file (optional) updated by non-None ``overrides``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if yaml_path:
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of settings")
        for key, value in loaded.items():
            name = str(key).replace("-", "_")
            if name not in fields:
                raise ConfigError(f"{path}: unknown setting '{key}' "
                                  f"(known: {', '.join(sorted(fields))})")
            values[name] = value
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (what actually ran, defaults included)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path
