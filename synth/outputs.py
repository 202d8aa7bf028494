"""What a command may replace, and how it writes a folder (README, "Reliability").

Every command that writes a folder (``synth mine``, ``merge``, ``verify``, ``generate``; ``harness
export``, ``decontaminate``, ``mntp``) goes through here, so the rule has one home:

- the folder is built in a temporary sibling and renamed into place whole, so a reader sees the old
  folder or the new one, never half of one, and a failed command leaves no trace;
- an existing folder is replaced only when the command can prove it made it: the folder holds the
  command's marker (:data:`MARKER`, written last, naming every entry the command wrote) and no
  other entry, and the user asked for it (``--force``); a folder that does not exist or is empty
  is fine;
- never a command's own input, nor a folder that holds one or lies inside one.

Anything else is refused before the work, in one line that says what and where.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

MARKER = ".written-by.json"  # {"command": ..., "entries": [...], "created": ...}
SHOWN = 3  # entries named in a refusal


class OutputError(ValueError):
    """An output folder the command may not write; the message says what and where."""


def _marker(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(data, dict)
        and isinstance(data.get("command"), str)
        and isinstance(data.get("entries"), list)
    )
    return data if ok else None


def foreign_entries(folder: str | os.PathLike[str], command: str) -> list[str] | None:
    """The entries of ``folder`` that ``command`` did not write (sorted), or None when the folder
    holds no marker of ``command`` at all."""
    folder = Path(folder)
    data = _marker(folder)
    if data is None or data["command"] != command:
        return None
    written = {str(e) for e in data["entries"]} | {MARKER}
    # a temporary sibling of an entry (``.samples.parquet.tmp``, left by a kill) is the command's
    temporary = tuple(f".{e}." for e in written)
    return sorted(n for n in os.listdir(folder) if n not in written and not n.startswith(temporary))


def check_output(
    target: str | os.PathLike[str],
    command: str,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
    what: str = "--out",
    resume: bool = False,
) -> Path:
    """Refuse, before any work, an output ``command`` may not write (see the module docstring).

    Args:
        inputs: the folders and files the command reads; the output may not be, hold or lie in one.
        force: replace a folder the command wrote (without it such a folder is refused too).
        what: how the user named the output (``--out``, ``output``, ``mntp.output``).
        resume: the command writes into its own folder again (``synth generate``): a folder it
            wrote is accepted without ``force``.
    """
    target = Path(target)
    check_can_be_folder(target, what)
    here = target.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if here == source:
            raise OutputError(f"{what} {target} is the input {given}; write to another folder")
        if source.is_relative_to(here):
            raise OutputError(f"{what} {target} holds the input {given}; write to another folder")
        if here.is_relative_to(source):
            raise OutputError(f"{what} {target} lies inside the input {given}; write elsewhere")
    if not target.is_dir() or not any(target.iterdir()):
        return target
    foreign = foreign_entries(target, command)
    if foreign is None:
        raise OutputError(
            f"{what} {target} exists and is not a folder {command} wrote (no {MARKER} of it): "
            "not replaced; choose another folder or empty it"
        )
    if foreign:
        listed = ", ".join(foreign[:SHOWN]) + (" ..." if len(foreign) > SHOWN else "")
        raise OutputError(
            f"{what} {target} holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} "
            f"{command} did not write ({listed}): not replaced; move them or choose another folder"
        )
    if not (force or resume):
        raise OutputError(f"{what} {target} exists (written by {command}); --force replaces it")
    return target


def _write_marker(folder: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{MARKER}.")
    os.fchmod(fd, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, folder / MARKER)


def mark(
    folder: str | os.PathLike[str], command: str, entries: Iterable[str] | None = None
) -> None:
    """Write ``command``'s marker into ``folder``, naming ``entries`` (default: every entry it
    holds now); a command that writes its folder in place (``synth generate`` resumes into it)
    names the entries it will write."""
    folder = Path(folder)
    entries = sorted(set(os.listdir(folder) if entries is None else entries) - {MARKER})
    data = {
        "command": command,
        "entries": entries,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_marker(folder, data)


def adopt(
    folder: str | os.PathLike[str], command: str, entries: Iterable[str], proven: bool
) -> None:
    """Mark a folder written before the marker existed as ``command``'s, when ``proven`` (it holds
    what only that command writes) and it holds nothing but ``entries``."""
    folder, entries = Path(folder), tuple(entries)
    if not proven or not folder.is_dir() or (folder / MARKER).exists():
        return
    names = os.listdir(folder)
    temporary = tuple(f".{e}." for e in entries)
    if names and all(n in entries or n.startswith(temporary) for n in names):
        mark(folder, command, entries)


def claim(
    folder: str | os.PathLike[str],
    command: str,
    entries: Iterable[str],
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    what: str = "--out",
) -> Path:
    """For a command that writes its folder in place and comes back to it (``synth generate``
    resumes, ``harness train`` trains again): check it, make it and mark it with ``entries``."""
    folder = check_output(folder, command, inputs=inputs, what=what, resume=True)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).exists():
        mark(folder, command, entries)
    return folder


def record(folder: str | os.PathLike[str], *names: str) -> None:
    """Add ``names`` to the marker of ``folder`` when it has one: a command that writes files into
    another command's folder (``synth audit`` beside a corpus) keeps that folder replaceable."""
    folder = Path(folder)
    data = _marker(folder)
    if data is None:
        return
    data["entries"] = sorted({*map(str, data["entries"]), *names})
    _write_marker(folder, data)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def replacing(
    target: str | os.PathLike[str],
    command: str,
    *,
    inputs: Iterable[str | os.PathLike[str]] = (),
    force: bool = False,
    what: str = "--out",
) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``target`` to write into; on success, mark it and rename
    it to ``target`` (replacing a folder :func:`check_output` accepts, checked again at the swap);
    on failure remove it and leave ``target`` as it was."""
    inputs = list(inputs)
    target = check_output(target, command, inputs=inputs, force=force, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.new-", dir=target.parent))
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700; the output is as readable as others
    old: Path | None = None
    try:
        yield staging
        mark(staging, command)
        check_output(target, command, inputs=inputs, force=force, what=what)  # still replaceable
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "folder")
        try:
            os.replace(staging, target)
        except BaseException:
            if old is not None:  # put the replaced folder back
                os.replace(old / "folder", target)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_can_be_folder(
    target: Path, what: str, *, why: str | None = None, error: type[Exception] = OutputError
) -> None:
    """Refuse a ``target`` that cannot become a folder: a file, under one, or in a folder nothing
    can be created in (tried for real: the permission bits do not bind root). ``why`` ends the
    message of a file in the way; ``error`` is the caller's error class."""
    for p in (target, *target.parents):
        if p.exists() and not p.is_dir():
            raise error(
                f"{what} {target}: {p} is a file, not a folder" + (f" ({why})" if why else "")
            )
        if p.exists():
            try:
                tempfile.TemporaryDirectory(dir=p, prefix=".write-check-").cleanup()
            except OSError as e:
                raise error(f"{what} {target}: cannot write in {p} ({e.strerror or e})") from None
            return
