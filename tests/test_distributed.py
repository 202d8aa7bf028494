"""Distributed InfoNCE (``harness/distributed.py``): two gloo workers on the CPU, each embedding its
shard of the global batch, give the loss and LoRA gradients of the one-worker step on the same
global batch, for every pooling, with GradCache, and with a batch that does not split evenly.

The model is the packaged SmolLM2-135M cut to its first 4 of 30 decoder layers (real tokenizer and
weights, fp32, LoRA r=4 without dropout, 24-token inputs), loaded once per worker; the three
poolings are three embedders over that one backbone.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from harness.config import ModelSettings
from harness.distributed import DataParallel, shard_bounds
from harness.embedder import Embedder
from harness.loss import duplicate_mask
from harness.models import apply_lora, load_backbone
from harness.schedules import Example
from harness.train import StepRunner, doc_texts

WORKERS = 2
POOLINGS = ("eos", "mean", "ata")
TEMPERATURE = 0.05
INSTRUCTION = "Retrieve semantically similar text."
LAYERS = 4  # of SmolLM2's 30


def _example(i: int, query: str, positive: str, *negatives: str) -> Example:
    return Example(
        INSTRUCTION, query, positive, negatives, (1,) * len(negatives), str(i), INSTRUCTION
    )


# Examples 0 and 3 share their positive (they land on different workers): the duplicate mask must
# leave each out of the other's negatives. Example 4 has two hard negatives, so the uneven batch
# (3 + 2 examples) also has shards with different numbers of documents.
EXAMPLES = [
    _example(0, "A man plays a guitar.", "Someone is making music.", "Nobody is playing."),
    _example(1, "Two dogs run on the beach.", "Animals are outside.", "The dogs are asleep."),
    _example(2, "A child eats an apple.", "A kid has a snack.", "The child is starving."),
    _example(3, "A woman sings on stage.", "Someone is making music.", "The stage is empty."),
    _example(
        4,
        "A cyclist climbs a hill.",
        "A person rides a bike.",
        "The cyclist is at home.",
        "A car drives downhill.",
    ),
]
BATCHES = {"even": EXAMPLES[:4], "uneven": EXAMPLES}
# (pooling, batch, GradCache chunk): every pooling plain on the even batch, and with GradCache
# (chunk 2, smaller than a worker's 9 or 6 inputs) on the uneven one
CASES = [(pooling, "even", None) for pooling in POOLINGS] + [
    (pooling, "uneven", 2) for pooling in POOLINGS
]
# the one-worker reference steps, shared out between the workers
REFERENCES = [
    [(pooling, name) for i, (pooling, name, _) in enumerate(CASES) if i % WORKERS == rank]
    for rank in range(WORKERS)
]


def _embedders() -> dict[str, Embedder]:
    """One LoRA backbone with the same non-zero adapter weights on every worker, three poolings."""
    settings = ModelSettings(
        lora={"r": 4, "alpha": 8, "dropout": 0.0},
        max_query_length=24,
        max_doc_length=24,
        dtype="float32",
    )
    device = torch.device("cpu")
    backbone = load_backbone(settings, device)
    base = backbone.model  # keep the first LAYERS decoder layers: the same code, 1/7 of the compute
    base.layers = torch.nn.ModuleList(base.layers[:LAYERS])
    base.config.num_hidden_layers = LAYERS
    backbone = dataclasses.replace(backbone, model=apply_lora(backbone.model, settings.lora))
    torch.manual_seed(0)
    for p in backbone.model.parameters():  # LoRA B starts at zero: make every gradient non-zero
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    out = {}
    for pooling in POOLINGS:
        emb = Embedder(backbone, settings.model_copy(update={"pooling": pooling}), device)
        out[pooling] = emb.train()
    return out


def _step(
    emb: Embedder, batch: list[Example], chunk: int | None, parallel: DataParallel | None
) -> tuple[float, dict[str, torch.Tensor]]:
    emb.zero_grad(set_to_none=True)
    loss = StepRunner(emb, TEMPERATURE, chunk, parallel)(batch)
    grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.requires_grad}
    return loss, grads


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORKERS,
        timeout=timedelta(seconds=120),
    )
    try:
        parallel = DataParallel.current()
        embedders = _embedders()
        weights = torch.cat([p.detach().reshape(-1) for p in embedders["eos"].parameters()])
        results: dict[str, object] = {"weights_sum": float(weights.double().sum())}
        for pooling, name, chunk in CASES:
            emb = embedders[pooling]
            results[f"{pooling}/{name}/{chunk}"] = _step(emb, BATCHES[name], chunk, parallel)
        for pooling, name in REFERENCES[rank]:
            results[f"{pooling}/{name}/single"] = _step(
                embedders[pooling], BATCHES[name], None, None
            )
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_shard_bounds_are_contiguous_and_refuse_empty_shards():
    assert shard_bounds(4, 2) == [(0, 2), (2, 4)]
    assert shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert shard_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert shard_bounds(3, 1) == [(0, 3)]
    parallel = DataParallel(rank=1, world_size=2)
    assert parallel.shard(list("abcde")) == ["d", "e"]
    assert parallel.shards(list("abcde")) == [["a", "b", "c"], ["d", "e"]]
    with pytest.raises(ValueError, match="cannot be split over 3 workers"):
        shard_bounds(2, 3)
    # the test batch's duplicate positive sits on the other worker than its twin
    batch = BATCHES["even"]
    mask = duplicate_mask([ex.positive for ex in batch], doc_texts(batch))
    assert mask.nonzero().tolist() == [[0, 3], [3, 0]]
    assert [ex.row_id for ex in parallel.shard(batch)] == ["2", "3"]


def test_two_workers_give_the_one_worker_loss_and_gradients(smollm2_dir, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORKERS)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORKERS)]
    assert ranks[0]["weights_sum"] == ranks[1]["weights_sum"]  # the same initial weights
    for pooling, name, chunk in CASES:
        ref_loss, ref_grads = next(
            r[f"{pooling}/{name}/single"] for r in ranks if f"{pooling}/{name}/single" in r
        )
        scale = max(float(g.abs().max()) for g in ref_grads.values())
        assert scale > 0
        worst, worst_loss = 0.0, 0.0
        for r in ranks:
            loss, grads = r[f"{pooling}/{name}/{chunk}"]
            worst_loss = max(worst_loss, abs(loss - ref_loss))
            assert abs(loss - ref_loss) < 1e-5, (pooling, name, chunk, loss, ref_loss)
            assert grads.keys() == ref_grads.keys()
            for key, g in grads.items():
                diff = float((g - ref_grads[key]).abs().max())
                worst = max(worst, diff)
                assert diff <= 5e-5 * scale, (pooling, name, chunk, key, diff, scale)
        print(
            f"{pooling} {name} chunk={chunk}: loss {ref_loss:.6f} (max diff {worst_loss:.1e}), "
            f"grad scale {scale:.3e}, max abs grad diff {worst:.3e} ({worst / scale:.1e} of scale)"
        )
