"""Checks of weight files before they are used again: recorded sha256s and finite tensors.

A saved model (``embedder.json``) and an MNTP adapter (``mntp.json``) record the sha256 of their
files when they are written; whatever restores, reuses or exports them checks those hashes and that
every floating-point tensor loads and is finite. A problem is returned as one line naming the file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from synth.corpus import sha256_file

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def file_hashes(root: Path, files: Iterable[Path]) -> dict[str, str]:
    """The sha256 of each of ``files``, by path relative to ``root`` (what a record holds)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(files)}


def hash_problem(root: Path, recorded: Mapping[str, str], where: Path) -> str | None:
    """Why the files under ``root`` are not those ``recorded`` (in the file ``where``), or None."""
    for name, expected in sorted(recorded.items()):
        file = root / name
        if not file.is_file():
            return f"{file}: missing (recorded in {where})"
        found = sha256_file(file)
        if found != expected:
            return (
                f"{file}: sha256 {found[:12]}… is not the {str(expected)[:12]}… recorded in "
                f"{where.name} (the file changed or was cut short)"
            )
    return None


def finite_problem(file: Path) -> str | None:
    """Why the weights file ``file`` cannot be used (unreadable, a tensor not finite), or None."""
    import torch

    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(file)
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch raise several types for cut or garbled files
        first = (str(e).splitlines() or [""])[0]
        return f"{file}: cannot be read ({type(e).__name__}: {first})"
    if not isinstance(tensors, Mapping):
        return f"{file}: not a mapping of tensors"
    for name, tensor in tensors.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.isfinite().all():
            return f"{file}: weight {name} is not finite (NaN or infinite)"
    return None
