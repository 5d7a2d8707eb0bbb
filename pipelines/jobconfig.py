"""One way to read a job config, shared by every job (the archive job, training).

A job config is a YAML file validated into a strict pydantic model (:class:`StrictModel`: unknown keys are errors,
values are frozen). :func:`load_job_config` reads it, applies dotted overrides (``--set schedule.max_steps=20``),
resolves the relative paths the job names against the YAML file's folder, and validates. Every refusal is a
:class:`ConfigError` whose message holds one line per offending field, the field's dotted path first::

    optim.lr: Input should be greater than 0
    data.train.0.path: cannot read it: [Errno 2] No such file or directory: 'a.json'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class ConfigError(ValueError):
    """A job config was refused; ``str(error)`` names every offending field, one per line."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


Config = TypeVar("Config", bound=BaseModel)

# a cross-field check names the field it blames first: "overlap: ..." or "optim.warmup_steps: ..."
_FIELD_PREFIX = re.compile(r"^(?:Value error, )?([a-z_][a-z0-9_.]*): (.*)$", re.DOTALL)


def format_errors(exc: ValidationError) -> str:
    """One ``dotted.field: message`` line per validation error (``(config)`` for the top level)."""
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = str(err["msg"])
        m = _FIELD_PREFIX.match(msg)
        if m:
            loc.extend(m.group(1).split("."))
            msg = m.group(2)
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        lines.append(f"{'.'.join(loc) or '(config)'}: {msg}")
    return "\n".join(lines)


def validate(schema: type[Config], data: Any) -> Config:
    """Validate a config mapping against ``schema``.

    Raises:
        ConfigError: Naming each offending field.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"(config): expected a mapping at the top level, got {type(data).__name__}")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` (command-line ``--set`` values) -> ``{"a.b": 1, "c": ["x", "y"]}``, values as YAML.

    Raises:
        ConfigError: An item without ``=``, or a value that is not YAML.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"(override): expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{key.strip()}: the value {value!r} is not valid YAML: {exc}") from None
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any]) -> None:
    """Set dotted keys in ``data`` in place (``{"output.root": "/tmp/out"}``), creating missing sections.

    Raises:
        ConfigError: A key below a value that is not a mapping.
    """
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{dotted}: cannot set a key below a non-mapping value")
        node[leaf] = value


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
        return str((base / value).resolve())
    return value


def resolve_relative_paths(data: Any, base: Path, fields: Sequence[str]) -> None:
    """Make the relative local paths at ``fields`` absolute against ``base``, in place.

    URLs (``s3://...``) and absolute paths are left alone, and so are missing fields.

    Args:
        data: The parsed YAML.
        base: Folder the paths are relative to (the YAML file's).
        fields: Dotted paths; ``*`` stands for every element of a list, e.g. ``data.train.*.path``.
    """
    for pattern in fields:
        _resolve_at(data, pattern.split("."), base)


def _resolve_at(node: Any, parts: list[str], base: Path) -> None:
    head, rest = parts[0], parts[1:]
    children: list[Any]
    if head == "*":
        children = list(range(len(node))) if isinstance(node, list) else []
    else:
        children = [head] if isinstance(node, dict) and node.get(head) is not None else []
    for key in children:
        if rest:
            _resolve_at(node[key], rest, base)
        else:
            node[key] = _resolve(node[key], base)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds.

    Raises:
        ConfigError: The file cannot be read, is not YAML, or holds no mapping.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"(config): cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"(config): {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"(config): {path} must hold a mapping, got {type(data).__name__}")
    return data


def load_job_config(
    schema: type[Config],
    path: str | Path,
    overrides: Mapping[str, Any] | None = None,
    *,
    relative_to_file: Sequence[str] = (),
) -> Config:
    """Read, override, resolve and validate a YAML job config.

    Args:
        schema: The job's config model.
        path: The YAML file.
        overrides: Dotted keys set after reading (before paths are resolved).
        relative_to_file: Dotted fields (``*`` for list elements) whose relative paths are relative to the YAML
            file's folder; every other path stays as written (relative to the current directory).

    Returns:
        The validated config.

    Raises:
        ConfigError: If the file cannot be read or parsed, or a field is invalid.
    """
    data = read_yaml(path)
    apply_overrides(data, overrides or {})
    resolve_relative_paths(data, Path(path).absolute().parent, relative_to_file)
    return validate(schema, data)
