"""The flat collectives of elixir.comm against sums computed here, on 2, 3 and 4 gloo ranks.

On gloo they are all-to-alls (see [Note: collectives on gloo] in elixir/comm.py), or reads of the
peers' shared memory when given an arena ([Note: shared memory between ranks] in elixir/shm.py). Each
rank knows every rank's input (seeded by rank), so it can compute the expected result itself.
"""

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks

from elixir import comm
from elixir.memory.chunk import ChunkGroup
from elixir.shm import SharedArena

N = 1000  # elements per shard


def _input(rank: int, world: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(world * N, generator=g).to(dtype)


def _collectives(rank, world, dtype, mean_over, shared="none"):
    """shared: "none" (sockets), "all" (every source in the arena), "not-rank-0" (rank 0's sources are
    not shared memory: every rank must fall back to sockets together)."""
    group = ChunkGroup(dist.group.WORLD, rank, world, mean_over=mean_over)
    arena = SharedArena.create(group) if shared != "none" else None
    if shared != "none":
        assert arena is not None, "ranks on one host should get a shared-memory arena"

    def buffer(values):
        if arena is None or (shared == "not-rank-0" and rank == 0):
            return values.clone()
        t = arena.empty(values.numel(), values.dtype)
        return t.copy_(values)

    inputs = [_input(r, world, dtype) for r in range(world)]
    total = torch.zeros(world * N, dtype=torch.float64)
    for t in inputs:
        total += t.double()
    want = (total / (mean_over or world))[rank * N : (rank + 1) * N]
    for async_op in (False, True):
        full = buffer(inputs[rank])
        out = torch.full((N,), float("nan"), dtype=dtype)
        pending = comm.reduce_scatter_mean(out, full, group, async_op=async_op, arena=arena, defer_done=async_op)
        if async_op:
            pending.wait()
            if pending.trailing is not None:
                pending.trailing.wait()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        assert torch.equal(full, inputs[rank]), "the reduce-scatter changed its input"

        # all-gather from a shard that is a slice of the output, and from one that is not
        shards = [_input(r, world, dtype)[:N] for r in range(world)]
        gathered = torch.cat(shards)
        for in_place in (True, False):
            full = buffer(torch.full((world * N,), float("nan"), dtype=dtype))
            if in_place:
                full[rank * N : (rank + 1) * N] = shards[rank]
                shard = full[rank * N : (rank + 1) * N]
            else:
                shard = shards[rank].clone()
            pending = comm.all_gather(full, shard, group, async_op=async_op, arena=arena)
            if async_op:
                pending.wait()
            assert torch.equal(full, gathered), f"all-gather (in place: {in_place}) differs"
            assert torch.equal(shard, shards[rank])


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduce_scatter_and_all_gather_match_sums(world):
    run_ranks(_collectives, world, torch.float32, 0)


@pytest.mark.dist
def test_bf16_and_a_divisor_other_than_the_group_size():
    # expert-parallel groups divide by the world, not by their own size
    run_ranks(_collectives, 2, torch.bfloat16, 4)


@pytest.mark.dist
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shared", ["all", "not-rank-0"])
def test_through_shared_memory(world, shared):
    run_ranks(_collectives, world, torch.float32, 0, shared)


def _arena_switch(rank, world, results):
    import os

    group = ChunkGroup(dist.group.WORLD, rank, world)
    os.environ["ELIXIR_SHM"] = "0" if rank == 1 else "1"  # one rank says no: no rank uses an arena
    results.put(("one-says-no", rank, SharedArena.create(group) is None))
    os.environ["ELIXIR_SHM"] = "1"
    results.put(("all-agree", rank, SharedArena.create(group) is not None))


@pytest.mark.dist
def test_every_rank_agrees_on_the_arena():
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    run_ranks(_arena_switch, 2, q)
    seen = []
    while not q.empty():
        seen.append(q.get())
    assert sorted(seen) == [("all-agree", 0, True), ("all-agree", 1, True), ("one-says-no", 0, True),
                            ("one-says-no", 1, True)]
