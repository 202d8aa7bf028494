"""Reading the text files a user hands in (.jsonl, .tsv, .txt, YAML), with one-line errors.

Every reader here turns what would otherwise be a raw traceback into a :class:`TextFileError` that
names the file and the line: bytes that are not UTF-8, JSON nested too deeply for the parser or
broken, YAML whose aliases expand into more values than any configuration holds (a "billion laughs"
file that would eat memory once a loader walks it), YAML nested too deeply. ``synth`` and ``harness``
both read their inputs through it (``synth`` never imports ``harness``).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

MAX_YAML_VALUES = (
    100_000  # values of a YAML file once its aliases are expanded; configs hold hundreds
)


class TextFileError(ValueError):
    """A user's text file cannot be read; the message names the file and the line."""


def lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 is an error naming it."""
    path = Path(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TextFileError(
                    f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                ) from None


def read_text(path: str | os.PathLike[str]) -> str:
    """A whole UTF-8 text file (see :func:`lines`)."""
    return "".join(line for _, line in lines(path))


def json_value(text: str, where: str) -> Any:
    """``json.loads`` whose failures (broken, nested too deeply) name ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TextFileError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise TextFileError(f"{where}: JSON nested too deeply") from None


def jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, Any]]:
    """(``file:line``, value) of every non-empty line of a JSON-lines file."""
    for number, line in lines(path):
        if line.strip():
            where = f"{path}:{number}"
            yield where, json_value(line, where)


def tsv_rows(path: str | os.PathLike[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of a tab-separated file without quoting (the shared data's layout)."""
    numbered = list(lines(path))
    reader = csv.reader((line for _, line in numbered), delimiter="\t", quoting=csv.QUOTE_NONE)
    for (number, _), row in zip(numbered, reader):
        yield number, row


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with its failures named: broken YAML (line and column), nested too deeply,
    or aliases that expand into more than :data:`MAX_YAML_VALUES` values."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses unprintable characters here already
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_VALUES:
            raise TextFileError(
                f"{where}: the YAML expands to {size:,} values through its aliases (at most "
                f"{MAX_YAML_VALUES:,}): a file of settings never needs that many"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TextFileError(f"{where}: broken YAML{at}: {problem}") from None
    except RecursionError:  # PyYAML composes and constructs nested blocks recursively
        raise TextFileError(f"{where}: broken YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Values in ``node`` once every alias is expanded (an alias is the same node object again)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a node that contains itself counts once (PyYAML builds such cycles lazily)
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        total = 1
    total = min(total, MAX_YAML_VALUES + 1)  # enough to refuse; keeps the sums small
    memo[key] = total
    return total
