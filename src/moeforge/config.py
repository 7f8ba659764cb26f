"""One config system: pydantic models, YAML files, and ``--set a.b=c`` overrides.

Every config class derives from :class:`StrictModel`, so unknown keys are errors and not silently
ignored. :func:`load_yaml_config` reads a file, applies overrides and validates; any problem raises
:class:`ConfigError` whose message names the file, the field and what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "StrictModel",
    "apply_overrides",
    "deep_merge",
    "format_validation_error",
    "load_yaml_config",
    "parse_override",
]

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem a user can fix; the message says where and how."""


class StrictModel(BaseModel):
    """Base for all configs: unknown fields are rejected, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """Render a pydantic error as one line per problem: ``file: field.path: message (got value)``."""
    lines = []
    prefix = f"{source}: " if source else ""
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        # cross-field checks (model validators) have no location; their message names the fields
        lines.append(f"{prefix}{loc}: {msg}{shown}" if loc else f"{prefix}{msg}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so ``4``, ``0.1``, ``true``, ``[1,2]`` keep their types."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key.path=value`` override applied.

    Missing sections are created; a numeric part indexes a list (``sources.0.path=...``).
    """
    out: dict[str, Any] = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(
                        f"override {text!r}: {part!r} is not an index of that list (0..{len(node) - 1})"
                    )
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {path[depth - 1]!r} is a value, not a section")
            if last:
                node[part] = value
                break
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            node = child
    return out


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it: a mapping onto a mapping merges key by key, recursively; any
    other value replaces. Returns a new dict and changes neither argument (values it does not merge are
    shared, not copied)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{path}: is a directory; expected a YAML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); expected a YAML file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    return data


def load_yaml_config(cls: type[T], path: Path, overrides: list[str] | None = None) -> T:
    """Load ``path`` as ``cls``, applying ``overrides``; raises :class:`ConfigError` on any problem."""
    data = apply_overrides(read_yaml(path), overrides or [])
    return validate_config(cls, data, source=str(path))


def validate_config(cls: type[T], data: dict[str, Any], source: str | None = None) -> T:
    """Validate a dict as ``cls``; raises :class:`ConfigError` with one line per problem."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc
