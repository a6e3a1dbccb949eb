"""Collectives on flat 1-D buffers, with the version shims in one place.

Gloo takes only flat 1-D buffers for all-gather and reduce-scatter and rejects PREMUL_SUM/AVG, so
every collective here works on flat buffers and averages by dividing. A group of size one
communicates nothing: the single-process path is the same code with the communication skipped.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from elixir.memory.chunk import ChunkGroup

# torch 2.13 renames the tensor collectives; torch 2.6-2.12 only have the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather(full: torch.Tensor, shard: torch.Tensor, group: ChunkGroup, *, async_op: bool = False):
    """Gather every rank's `shard` into `full` (rank r's slice r). Returns a work handle or None."""
    if group.size == 1:
        if full.data_ptr() != shard.data_ptr():
            full[: shard.numel()].copy_(shard)
        return None
    return _all_gather_flat(full, shard, group=group.process_group, async_op=async_op)


def reduce_scatter_mean(shard_out: torch.Tensor, full: torch.Tensor, group: ChunkGroup) -> None:
    """Average `full` over the group into this rank's `shard_out` (slice `group.rank`)."""
    if group.size == 1:
        if shard_out.data_ptr() != full.data_ptr():
            shard_out.copy_(full)
        return
    _reduce_scatter_flat(shard_out, full, group=group.process_group)
    shard_out.div_(group.size)


def all_reduce_sum(t: torch.Tensor, group: ChunkGroup) -> torch.Tensor:
    if group.size > 1:
        dist.all_reduce(t, group=group.process_group)
    return t


def all_reduce_max(t: torch.Tensor, group: ChunkGroup) -> torch.Tensor:
    if group.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group.process_group)
    return t
