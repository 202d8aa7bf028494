"""A ``harness export`` folder as the model the evaluation embeds with.

An exported folder is a sentence-transformers model whose first module is the harness's own
``HarnessEmbedding`` (``harness/st_module.py``): pooling, attention, input format and lengths live
in its ``harness_embedding.json``, not in an ``embedder.json``. Loaded as a plain base model it
would be embedded with mean pooling, native attention and no adapter: a different model under the
trained model's name. Here it is loaded the way its users load it,
``SentenceTransformer(folder, trust_remote_code=True)``, and embeds the trained model's vectors
(``tests/test_export.py`` checks that the two agree).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.st_module import ADAPTER_DIR, HarnessEmbedding

if TYPE_CHECKING:
    from torch import Tensor

CONFIG_FILE = HarnessEmbedding.config_file_name
NOT_HASHED = {"README.md"}  # the model card: rewriting it changes no vector


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` is a ``harness export`` folder (it holds ``harness_embedding.json``)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def folder_sha256(folder: Path) -> str:
    """sha256 over the folder's files (relative names and bytes, sorted), the model card left
    out: two exports share mteb's cached results only when they embed with the same bytes."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in NOT_HASHED or "/__pycache__/" in f"/{name}":
            continue
        file_digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                file_digest.update(block)
        digest.update(name.encode() + b"\0" + file_digest.digest())
    return digest.hexdigest()


class ExportedEmbedder:
    """A :class:`harness.evaluation.encoder.TextEmbedder` over an exported folder.

    Args:
        folder: the ``harness export`` folder.
        device: where to run it (None: sentence-transformers' choice).
    """

    def __init__(self, folder: str | Path, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.folder = Path(folder)
        self.st = SentenceTransformer(str(self.folder), trust_remote_code=True, device=device)
        module = self.st[0]
        if type(module).__name__ != HarnessEmbedding.__name__:
            raise TypeError(f"{self.folder}: its first module is {type(module).__name__}")
        self.module: Any = module
        self.pooling: str = module.pooling
        self.sha256 = folder_sha256(self.folder)
        self.name = f"harness-export/{self.folder.resolve().name}"
        self.revision = self.sha256[:16]
        self.has_adapter = (self.folder / ADAPTER_DIR).is_dir()

    @property
    def max_doc_length(self) -> int:
        """The token budget of texts without an instruction (both sides of a symmetric task)."""
        return int(self.module.max_doc_length)

    def encode(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        show_progress: bool = False,
    ) -> Tensor:
        """Embed ``texts`` as :meth:`harness.embedder.Embedder.encode` does: an instruction gives
        the query format and budget, ``max_length`` replaces the budget (symmetric tasks)."""
        import torch

        if not len(texts):
            return torch.empty((0, self.st.get_sentence_embedding_dimension() or 0))
        lengths = (self.module.max_query_length, self.module.max_doc_length)
        if max_length is not None:
            self.module.max_query_length = self.module.max_doc_length = max_length
        try:
            vectors = self.st.encode(
                list(texts),
                instruction=instruction or None,
                batch_size=batch_size,
                convert_to_tensor=True,
                show_progress_bar=show_progress,
            )
        finally:
            self.module.max_query_length, self.module.max_doc_length = lengths
        return vectors.float().cpu()
