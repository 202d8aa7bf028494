"""The config-file toolkit shared by every YAML config of the project: the experiment file
(``harness/config.py``), the mining config (``synth/mine.py``) and SYNTH.yaml
(``synth/synth_config.py``). It lives in ``synth`` because ``synth`` never imports ``harness``.

- :class:`Strict`: the base of every config section; an unknown key is an error, never ignored.
- :func:`expand_env`: ``${VAR}``, ``$VAR`` and ``${VAR:-default}`` from the environment; an unset
  variable without a default is an error naming the file and the field.
- :func:`yaml_floats`: YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string; make it a float.
- :func:`read_mapping`: a YAML file read through :mod:`synth.textfiles`'s safe loader, which must
  hold a mapping at the top level.
- :func:`read_with_extends`: :func:`read_mapping` plus an ``extends:`` chain (a base file, its path
  relative to the extending file): mappings merge recursively, lists and scalars replace.
- :func:`format_validation`: a pydantic ``ValidationError`` as one line per error, naming the file
  and the dotted field.

Every error is a :class:`ConfigFileError` (or the subclass a caller passes), so each config keeps
its own exception type.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from synth.textfiles import TextFileError, load_yaml, read_text


class ConfigFileError(ValueError):
    """A config file is invalid; the message names the file and the field."""


class Strict(BaseModel):
    """A config section: a mistyped key is an error naming it, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


_ENV = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


def expand_env(value: str, where: str, error: type[ConfigFileError] = ConfigFileError) -> str:
    """``value`` with ``${VAR}`` / ``$VAR`` replaced from the environment (``${VAR:-default}``:
    ``default`` when VAR is unset) and a leading ``~`` expanded. An unset VAR without a default is
    an ``error`` ``"{where}: environment variable VAR is not set"``, never kept as text."""

    def sub(match: re.Match[str]) -> str:
        var, default = match.group(1) or match.group(3), match.group(2)
        if var in os.environ:
            return os.environ[var]
        if default is None:
            raise error(f"{where}: environment variable {var} is not set")
        return default

    return os.path.expanduser(_ENV.sub(sub, value))


def yaml_floats(data: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` (no dot) as a string: such strings, in mappings and lists at any
    depth, become floats again; every other value is returned as it is."""
    if isinstance(data, dict):
        return {k: yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [yaml_floats(v) for v in data]
    if isinstance(data, str):
        s = data.strip()
        if s and s[0] in "0123456789.-+" and any(c in s for c in "eE"):
            try:
                return float(s)
            except ValueError:
                return data
    return data


def read_mapping(
    path: str | os.PathLike[str], what: str, error: type[ConfigFileError] = ConfigFileError
) -> dict[str, Any]:
    """The mapping a YAML file holds (an empty file is ``{}``), read with the safe loader of
    :mod:`synth.textfiles`. Every failure is an ``error`` naming the file: not found (``what``
    names the kind of file), unreadable, not UTF-8, broken YAML, an alias bomb, not a mapping."""
    path = Path(path)
    try:
        data = load_yaml(read_text(path), str(path))
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e})") from None
    except TextFileError as e:  # not UTF-8, broken, nested too deeply, an alias bomb
        raise error(str(e)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping of keys, not {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, anything else replaced."""
    out = copy.deepcopy(dict(base))
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_with_extends(
    path: str | os.PathLike[str],
    what: str,
    error: type[ConfigFileError] = ConfigFileError,
    *,
    rebase: Callable[[dict[str, Any], Path, Path], None] | None = None,
    _seen: tuple[Path, ...] = (),
) -> dict[str, Any]:
    """The mapping of a YAML file with its ``extends:`` chain resolved (see the module docstring).
    ``rebase(base, base_dir, file_dir)``, when given, rewrites the base's relative paths in place
    so they keep pointing where they did from the base file."""
    path = Path(path)
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise error(f"{path}: 'extends' forms a cycle: {chain}")
    data = read_mapping(path, what, error)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise error(f"{path}: extends: must be a file path (got {parent!r})")
    base_file = path.parent / parent
    if not base_file.is_file():
        raise error(f"{path}: extends: {base_file} not found (or not a file)")
    base = read_with_extends(base_file, what, error, rebase=rebase, _seen=(*_seen, resolved))
    if rebase is not None:
        rebase(base, base_file.parent, path.parent)
    return deep_merge(base, data)


def format_validation(
    error: ValidationError,
    where: str,
    *,
    header: str | None = None,
    messages: Mapping[str, str] | None = None,
    show_input: bool = False,
) -> str:
    """One line per error: ``{where}: {dotted field}: {message}``; with ``header``, the first line
    is ``{where}: {header}`` and each error follows as ``  {dotted field}: {message}``.

    ``messages`` replaces pydantic's message by error type (e.g. ``extra_forbidden``);
    ``show_input`` appends `` (got VALUE)`` to every error but a missing or unknown key and a
    whole mapping."""
    lines = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = (messages or {}).get(err["type"], err["msg"])
        inp = err.get("input")
        if show_input and err["type"] not in ("missing", "extra_forbidden"):
            msg += "" if isinstance(inp, dict) else f" (got {inp!r})"
        lines.append(f"{field}: {msg}")
    if header is None:
        return "\n".join(f"{where}: {line}" for line in lines)
    return f"{where}: {header}\n" + "\n".join(f"  {line}" for line in lines)
