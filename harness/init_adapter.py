"""``model.init_adapter`` on the driver: find (or build with MNTP) the adapter, pin its content hash,
and ship its files to trials, which need no shared filesystem.

The hash (``model.init_adapter_sha256``) stands for the adapter in the trial key and the MLflow
params, wherever its files lie; a file that pins a hash refuses an adapter that differs. An adapter
the file's own ``mntp:`` block built is identified by its recipe instead
(``model.init_adapter_recipe``: base model, MNTP settings, text), so a machine that rebuilds it
keeps the trial keys of a committed store. A Hub id is its own identity (with the download it
names) and is not shipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.config import ConfigError, Experiment, is_local_path
from harness.weights import WEIGHT_SUFFIXES, finite_problem, hash_problem
from synth.locks import waiting

# Written by `harness mntp` beside the adapter it trains: base model, settings, text hash, and (its
# completion record) the sha256 of every file of the adapter. `harness mntp` trains into a
# temporary sibling and renames it into place whole, so a folder holding an mntp.json is its own.
MNTP_META = "mntp.json"
MNTP_FILES = "files"
# What makes a PEFT adapter: its config and its weights (README and tokenizer files are not part of it).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class AdapterFiles:
    """A local adapter's files, read once on the driver."""

    sha256: str
    files: dict[str, bytes]

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        return folder


def read_adapter(folder: Path) -> AdapterFiles:
    """The adapter files of ``folder`` and their hash (names and bytes, in a fixed order)."""
    files = {
        name: (folder / name).read_bytes() for name in ADAPTER_FILES if (folder / name).is_file()
    }
    if "adapter_config.json" not in files or len(files) < 2:
        raise ConfigError(
            f"model.init_adapter {folder}: not a PEFT adapter folder (needs adapter_config.json and adapter_model.*)"
        )
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return AdapterFiles(digest.hexdigest(), files)


def local_folder(exp: Experiment) -> Path | None:
    """The init adapter's local folder (None for none or a Hub id)."""
    source = exp.model.init_adapter
    if not source or (not is_local_path(source) and not exp.resolve_path(source).exists()):
        return None
    return exp.resolve_path(source).resolve()


def check_init_adapter(exp: Experiment) -> None:
    """Refuse, before anything expensive, an init adapter that is missing and that nothing builds."""
    if "model.init_adapter" in exp.grid or "model.init_adapter_sha256" in exp.grid:
        raise ConfigError(
            f"{exp.source}: grid axis model.init_adapter is not supported (its hash is pinned per "
            "file): use one experiment file per adapter"
        )
    folder = local_folder(exp)
    if folder is None or folder.exists() or _built_by_mntp(exp, folder):
        return
    hint = (
        ""
        if exp.mntp is None
        else f" (the file's mntp.output is {exp.resolve_path(exp.mntp.output)})"
    )
    raise ConfigError(
        f"{exp.source}: model.init_adapter {folder} does not exist; make it with `harness mntp "
        f"{exp.source}`{hint}"
    )


def _built_by_mntp(exp: Experiment, folder: Path) -> bool:
    return exp.mntp is not None and exp.resolve_path(exp.mntp.output).resolve() == folder


@dataclass(frozen=True)
class MntpState:
    """What the file's ``mntp.output`` folder holds: a complete adapter of the file's recipe
    (``ready``), or why not, and whether the folder is provably ``harness mntp``'s (so it may be
    rebuilt in place; a missing folder counts as its)."""

    ready: bool
    ours: bool
    reason: str = ""


def mntp_state(exp: Experiment, folder: Path) -> MntpState:
    """Check ``folder`` against its ``mntp.json``: the completion record's hashes, finite weights,
    and the recipe (base model, ``mntp:`` settings) of ``exp``."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return MntpState(False, True, "missing")
    meta_file = folder / MNTP_META
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # no mntp.json, a cut or garbled one
        return MntpState(False, False, f"no readable {MNTP_META} ({type(e).__name__})")
    if not isinstance(meta, dict) or not {"base_model", "settings"} <= set(meta):
        return MntpState(False, False, f"{meta_file} is not harness mntp's")
    files = meta.get(MNTP_FILES)
    if not isinstance(files, dict) or not files:
        return MntpState(False, True, f"{meta_file} has no completion record (training cut short?)")
    unrecorded = [n for n in ADAPTER_FILES if (folder / n).is_file() and n not in files]
    problem = (
        hash_problem(folder, files, meta_file)
        or (f"{folder / unrecorded[0]}: not in {meta_file}'s record" if unrecorded else None)
        or next(
            (
                p
                for name in sorted(files)
                if Path(name).suffix in WEIGHT_SUFFIXES and (p := finite_problem(folder / name))
            ),
            None,
        )
    )
    if problem:
        return MntpState(False, True, problem)
    assert exp.mntp is not None
    if meta["base_model"] != exp.model.name or meta["settings"] != exp.mntp.model_dump(mode="json"):
        return MntpState(
            False, True, "built with other base model or mntp: settings than the file's"
        )
    return MntpState(True, True)


@contextlib.contextmanager
def mntp_lock(folder: Path, say: Callable[[str], None] = lambda _: None) -> Iterator[None]:
    """Hold the lock of an MNTP output folder (a sibling file): one builder at a time on a machine,
    the others wait and then find it built. Re-entrant within a process."""
    with waiting(
        folder.parent / f".{folder.name}.lock",
        lambda holder: say(f"waiting for the MNTP adapter {folder}, being built by {holder}"),
    ):
        yield


def prepare_init_adapter(
    exp: Experiment,
    build: Callable[[Experiment, Path], None] | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> AdapterFiles | None:
    """Resolve ``exp.model.init_adapter`` and pin its hash into ``exp`` (in place). When it is the
    file's ``mntp.output``, it is used only if complete and of the file's recipe
    (:func:`mntp_state`); otherwise ``build`` (MNTP) rebuilds a folder of harness mntp's own, and
    anything else is refused. Returns the files to ship (None for none or a Hub id)."""
    check_init_adapter(exp)
    folder = local_folder(exp)
    if folder is None:
        return None
    if not _built_by_mntp(exp, folder):
        return _pin(exp, folder)
    with mntp_lock(folder, say):  # a builder elsewhere on this machine finishes first
        state = mntp_state(exp, folder)
        if not state.ready:
            if not state.ours:
                raise ConfigError(
                    f"{exp.source}: mntp.output {folder}: {state.reason}, so not an adapter "
                    "`harness mntp` completed; it is left alone: move it away or set mntp.output "
                    "elsewhere"
                )
            if build is None:
                raise ConfigError(
                    f"{exp.source}: model.init_adapter {folder}: {state.reason}; "
                    f"`harness mntp {exp.source}` builds it"
                )
            build(exp, folder)
        return _pin(exp, folder)


def _pin(exp: Experiment, folder: Path) -> AdapterFiles:
    adapter = read_adapter(folder)
    pinned = exp.model.init_adapter_sha256
    if pinned and pinned != adapter.sha256:
        raise ConfigError(
            f"{exp.source}: model.init_adapter {folder} has sha256 {adapter.sha256[:16]}…, but the file "
            f"pins model.init_adapter_sha256 {pinned[:16]}…"
        )
    exp.model.init_adapter = str(folder)
    exp.model.init_adapter_sha256 = adapter.sha256
    exp.model.init_adapter_recipe = mntp_recipe(exp, folder)
    return adapter


def mntp_recipe(exp: Experiment, folder: Path) -> str | None:
    """The recipe hash of an adapter that the file's ``mntp:`` block built with its current settings
    (None for any other adapter: a foreign one is known only by its weights)."""
    if exp.mntp is None or not _built_by_mntp(exp, folder):
        return None
    try:
        meta = json.loads((folder / MNTP_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = exp.mntp.model_dump(mode="json")
    if (
        not isinstance(meta, dict)
        or meta.get("base_model") != exp.model.name
        or meta.get("settings") != settings
    ):
        return None
    recipe = {
        "base_model": exp.model.name,
        "revision": exp.model.revision,
        "settings": settings,
        "text_sha256": meta.get("text_sha256"),
    }
    return hashlib.sha256(
        json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def pin_if_present(exp: Experiment) -> None:
    """Pin the hash of an init adapter that exists (``harness tables``: the current configuration's
    trial keys), and leave ``exp`` as it is otherwise."""
    folder = local_folder(exp)
    if folder is not None and folder.exists():
        try:
            prepare_init_adapter(exp)
        except ConfigError:
            pass
