"""Data parallelism within one trial: the InfoNCE loss over the global batch of several workers.

Each worker runs the same schedule (a pure function of corpus, strategy, steps, global batch and
seed), takes its fixed contiguous slice of every global batch (:meth:`DataParallel.shard`), and
embeds only that slice. The query, positive and hard-negative embeddings of all workers are then
all-gathered (:meth:`DataParallel.gather`), so every query sees the whole global batch as in-batch
negatives, as in LLM2Vec's supervised recipe, and the documents are laid out as in a one-worker
run: all positives in global batch order, then all hard negatives in global batch order. The
duplicate mask is taken over the global batch's texts, which every worker knows.

Why the gradients are exact. Every worker computes the same global loss ``L`` over all global
embeddings ``e_1 .. e_N``, but only its own embeddings keep their autograd path (the gathered
embeddings of the other workers are constants). Its backward therefore gives
``sum_{j in own shard} dL/de_j · de_j/dθ``; summing that over the workers
(:meth:`DataParallel.all_reduce_grads`, a sum, not a mean) gives the sum over all ``j``: the
gradient of a one-worker run on the same global batch, up to float rounding. LLM2Vec gets the same
result another way (its all-gather's backward sums every worker's ``dL/de`` back to the owner,
``world_size`` times the gradient, and DDP then averages); here nothing flows back through the
gather, and the gradient sum is the one collective of the backward pass.

The trainable (LoRA) gradients are summed in one flat buffer per device and dtype instead of
wrapping the model in ``DistributedDataParallel``: they are a few megabytes, reduced once per
optimizer step, and the model (gradient checkpointing, the ATA attention capture) stays as it is.
GradCache works per worker: ``harness.train.StepRunner`` embeds the local chunks without a graph,
gathers, takes the global loss's gradient with respect to the local embeddings, and re-embeds its
chunks with the graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def shard_bounds(size: int, world_size: int) -> list[tuple[int, int]]:
    """The ``[start, end)`` slice of each worker in a global batch of ``size`` examples.

    Contiguous and in rank order; when ``size`` does not divide evenly, the first ``size %
    world_size`` workers take one example more (as ``numpy.array_split``).
    """
    if world_size < 1:
        raise ValueError(f"world size must be at least 1, not {world_size}")
    if size < world_size:
        raise ValueError(
            f"a global batch of {size} examples cannot be split over {world_size} workers: "
            "every worker needs at least one (raise train.batch_size or use fewer workers)"
        )
    base, extra = divmod(size, world_size)
    bounds, start = [], 0
    for rank in range(world_size):
        end = start + base + (rank < extra)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class DataParallel:
    """This worker's place in a data-parallel group (``torch.distributed`` already initialized).

    Args:
        rank: this worker's rank in ``group``.
        world_size: the number of workers in ``group``.
        group: the process group; ``None`` is the default (world) group.
    """

    rank: int
    world_size: int
    group: Any = None  # a torch.distributed ProcessGroup

    @classmethod
    def current(cls, group: Any = None) -> DataParallel:
        """The rank and world size of ``group`` in the initialized default process group."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "torch.distributed is not initialized: call init_process_group first"
            )
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def shards(self, batch: Sequence[T]) -> list[list[T]]:
        """Every worker's slice of the global ``batch``, in rank order."""
        return [list(batch[a:b]) for a, b in shard_bounds(len(batch), self.world_size)]

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This worker's fixed contiguous slice of the global ``batch``."""
        start, end = shard_bounds(len(batch), self.world_size)[self.rank]
        return list(batch[start:end])

    def from_first(self, value: T) -> T:
        """Rank 0's ``value`` on every worker (a decision only the first worker can make)."""
        box = [value]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def all_objects(self, value: T) -> list[T]:
        """Every worker's ``value`` (picklable), in rank order, on every worker."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    def gather(self, local: Tensor) -> list[Tensor]:
        """All workers' ``local`` tensors, in rank order; first dimensions may differ.

        Entry ``rank`` is ``local`` itself, so it keeps its autograd path; the others are received
        copies without a graph. Sizes are exchanged first and the tensors padded to the longest
        (``all_gather`` needs equal shapes), as LLM2Vec's ``mismatched_sizes_all_gather``.
        """
        size = torch.tensor([local.shape[0]], dtype=torch.int64, device=local.device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)
        counts = [int(s.item()) for s in sizes]
        with torch.no_grad():
            padded = local.new_zeros((max(counts), *local.shape[1:]))
            padded[: local.shape[0]] = local
            received = [torch.empty_like(padded) for _ in counts]
            dist.all_gather(received, padded, group=self.group)
        parts = [r[:n] for r, n in zip(received, counts)]
        parts[self.rank] = local
        return parts

    def all_reduce_grads(self, params: Iterable[Tensor]) -> None:
        """Sum the gradients of the trainable ``params`` over the workers, in place.

        One flat buffer per device and dtype, one ``all_reduce`` each. A trainable parameter
        without a gradient counts as zeros (and gets them), so every worker reduces the same list.
        """
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in params:
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
