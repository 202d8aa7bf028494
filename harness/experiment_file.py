"""Reading an experiment file and deriving its trials, validated before anything heavy runs.

An experiment file (YAML) describes one sweep. It may ``extends:`` a base file (a path relative to
itself); mappings are merged recursively, lists and scalars replace, and the base file's relative
paths are rebased onto the extending file. ``--set a.b=value`` overrides are applied last. The grid
expands into cells, each one trial's values. Every error names the file and the dotted field. The
schema itself is :mod:`harness.config`.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from harness.config import (
    AXIS_ALIASES,
    ConfigError,
    Experiment,
    field_exists,
    flatten,
    is_local_path,
)
from synth.configfile import format_validation, read_with_extends, yaml_floats

# ---------------------------------------------------------------- loading and errors


_MESSAGES = {
    "extra_forbidden": "unknown key (check the spelling; see the experiment file reference in README.md)",
    "missing": "required field is missing",
}


def load_raw(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML file and resolve its ``extends`` chain into one mapping."""
    return read_with_extends(path, "experiment file", ConfigError, rebase=_rebase_paths)


_PATH_FIELDS = (("corpus", "path"), ("corpus", "build", "config"), ("mntp", "output"))


def _relative(path: object) -> bool:
    """A path that means something else from another folder: not absolute, not ``~``, and not
    starting with ``$`` (``${NM_SHARED_DATA}/...`` is expanded later, where it is absolute)."""
    return (
        isinstance(path, str)
        and not path.startswith("$")
        and not os.path.isabs(os.path.expanduser(path))
    )


def _rebase_paths(data: dict[str, Any], src: Path, dst: Path) -> None:
    def rebase(path: str) -> str:
        return os.path.relpath(src / path, dst)

    for keys in _PATH_FIELDS:
        node: Any = data
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if isinstance(node, dict) and _relative(node.get(keys[-1])):
            node[keys[-1]] = rebase(node[keys[-1]])
    model = data.get("model")
    adapter = model.get("init_adapter") if isinstance(model, dict) else None
    if _relative(adapter) and is_local_path(adapter):
        model["init_adapter"] = rebase(adapter)
    mntp = data.get("mntp")
    if isinstance(mntp, dict) and isinstance(mntp.get("text"), list):
        mntp["text"] = [rebase(t) if t != "corpus" and _relative(t) else t for t in mntp["text"]]
    eval_tasks = data.get("eval", {}).get("tasks") if isinstance(data.get("eval"), dict) else None
    if isinstance(eval_tasks, list):
        data["eval"]["tasks"] = [
            rebase(t) if _relative(t) and _looks_like_path(t) else t for t in eval_tasks
        ]


def _looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or "/" in s


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> ("a.b", yaml-parsed value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected FIELD=VALUE, e.g. train.lr=1e-4")
    key, value = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: empty field name")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    parsed = yaml_floats(_yaml12_scalar(value.strip(), parsed))
    return AXIS_ALIASES.get(key, key), parsed


_YAML12_INT = re.compile(r"[-+]?[0-9]+")
_YAML12_FLOAT = re.compile(
    r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)"
)


def _yaml12_scalar(text: str, parsed: Any) -> Any:
    """Undo YAML 1.1's surprises in a ``--set`` value: ``yes``/``on`` as booleans, ``0x10``,
    ``0o17``, ``1_000`` or ``1:30`` (sexagesimal) as numbers stay the text they are (the field's
    type then accepts or names them); ``true``/``false`` and plain decimal numbers are unchanged."""
    if isinstance(parsed, bool):
        return parsed if text.lower() in ("true", "false") else text
    if isinstance(parsed, int):
        return parsed if _YAML12_INT.fullmatch(text) else text
    if isinstance(parsed, float):
        return parsed if _YAML12_FLOAT.fullmatch(text) else text
    return parsed


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {dotted!r}: {part!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def validate(data: Mapping[str, Any], where: str = "<experiment>") -> Experiment:
    try:
        exp = Experiment.model_validate(yaml_floats(dict(data)))
    except ValidationError as e:
        raise ConfigError(
            format_validation(
                e, where, header="invalid experiment file", messages=_MESSAGES, show_input=True
            )
        ) from None
    return exp


def load_experiment(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Experiment:
    """Load, merge ``extends``, apply ``--set`` overrides and validate an experiment file."""
    data = load_raw(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    where = str(path) + (f" (with --set {' '.join(overrides)})" if overrides else "")
    exp = validate(data, where)
    exp.source = str(Path(path))
    return exp


# ---------------------------------------------------------------- the grid


def grid_cells(exp: Experiment) -> list[dict[str, Any]]:
    """Every combination of the grid axes, in file order (first axis slowest)."""
    if not exp.grid:
        return [{}]
    axes = list(exp.grid)
    return [dict(zip(axes, combo)) for combo in itertools.product(*(exp.grid[a] for a in axes))]


def validated_cells(exp: Experiment) -> list[dict[str, Any]]:
    """:func:`grid_cells`, each applied once: a bad grid value (an unknown strategy, a wrong type)
    is a :class:`ConfigError` naming the file and the field before anything is built or run."""
    cells = grid_cells(exp)
    seen: dict[tuple[str, str], Any] = {}
    for axis, values in exp.grid.items():  # 1, 1.0 and true are one seed: the field's type decides
        for value in values:
            resolved = flatten(apply_cell(exp, {axis: value}).model_dump(mode="json"))
            canonical = json.dumps(
                {k: v for k, v in resolved.items() if k == axis or k.startswith(axis + ".")},
                sort_keys=True,
            )
            if (axis, canonical) in seen:
                raise ConfigError(
                    f"{exp.source or exp.name}: grid axis {axis!r} repeats a value: {seen[(axis, canonical)]!r} and "
                    f"{value!r} are the same {axis}"
                )
            seen[(axis, canonical)] = value
    for cell in cells:
        apply_cell(exp, cell)
    return cells


def apply_cell(exp: Experiment, cell: Mapping[str, Any]) -> Experiment:
    """The experiment with one grid cell's values set (validated again)."""
    data = exp.model_dump(mode="json")
    for key, value in cell.items():
        set_dotted(data, AXIS_ALIASES.get(key, key), value)
    data["grid"] = {}
    data["search"] = None
    out = validate(data, f"{exp.source or exp.name} (cell {cell_label(cell)})")
    out.source = exp.source
    return out


def parse_cell(items: Iterable[str], exp: Experiment) -> dict[str, Any]:
    """``strategy=curriculum,pooling=ata`` (or a list of such) -> a grid cell, checked against the grid."""
    cell: dict[str, Any] = {}
    for item in items:
        for part in filter(None, (p.strip() for p in item.split(","))):
            key, value = parse_override(part)
            cell[key] = value
    for key, value in cell.items():
        if key in exp.grid and value not in exp.grid[key]:
            raise ConfigError(f"--cell {key}={value!r}: not in the grid's values {exp.grid[key]}")
        if not field_exists(key):
            raise ConfigError(f"--cell {key}: not a field of the experiment")
    return cell


def cell_label(cell: Mapping[str, Any]) -> str:
    """Run name of a cell, like ``curriculum-ata-s1`` (strategy, pooling, others, seed last)."""
    order = ["train.strategy", "model.pooling"]
    keys = [k for k in order if k in cell] + sorted(
        k for k in cell if k not in (*order, "train.seed")
    )
    parts = [str(cell[k]) if k in order else f"{k.split('.')[-1]}={cell[k]}" for k in keys]
    if "train.seed" in cell:
        parts.append(f"s{cell['train.seed']}")
    return "-".join(parts) or "base"
