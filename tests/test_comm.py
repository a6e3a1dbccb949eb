"""The flat collectives of elixir.comm against sums computed here, on 2, 3 and 4 gloo ranks.

On gloo they are all-to-alls (see [Note: collectives on gloo] in elixir/comm.py); each rank knows every
rank's input (seeded by rank), so it can compute the expected result itself.
"""

import pytest
import torch
import torch.distributed as dist
from dist import run_ranks

from elixir import comm
from elixir.memory.chunk import ChunkGroup

N = 1000  # elements per shard


def _input(rank: int, world: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(world * N, generator=g).to(dtype)


def _collectives(rank, world, dtype, mean_over):
    group = ChunkGroup(dist.group.WORLD, rank, world, mean_over=mean_over)
    inputs = [_input(r, world, dtype) for r in range(world)]
    total = torch.zeros(world * N, dtype=torch.float64)
    for t in inputs:
        total += t.double()
    want = (total / (mean_over or world))[rank * N : (rank + 1) * N]
    for async_op in (False, True):
        full = inputs[rank].clone()
        out = torch.full((N,), float("nan"), dtype=dtype)
        pending = comm.reduce_scatter_mean(out, full, group, async_op=async_op)
        if async_op:
            pending.wait()
        tol = 1e-6 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        assert torch.equal(full, inputs[rank]), "the reduce-scatter changed its input"

        # all-gather from a shard that is a slice of the output, and from one that is not
        shards = [_input(r, world, dtype)[:N] for r in range(world)]
        gathered = torch.cat(shards)
        for in_place in (True, False):
            full = torch.full((world * N,), float("nan"), dtype=dtype)
            if in_place:
                full[rank * N : (rank + 1) * N] = shards[rank]
                shard = full[rank * N : (rank + 1) * N]
            else:
                shard = shards[rank].clone()
            pending = comm.all_gather(full, shard, group, async_op=async_op)
            if async_op:
                pending.wait()
            assert torch.equal(full, gathered), f"all-gather (in place: {in_place}) differs"
            assert torch.equal(shard, shards[rank])


@pytest.mark.parametrize("world", [2, 3, 4])
def test_reduce_scatter_and_all_gather_match_sums(world):
    run_ranks(_collectives, world, torch.float32, 0)


def test_bf16_and_a_divisor_other_than_the_group_size():
    # expert-parallel groups divide by the world, not by their own size
    run_ranks(_collectives, 2, torch.bfloat16, 4)
