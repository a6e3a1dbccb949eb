"""elixir.plan(): profile a model on the meta device, then search the fastest plan that fits."""

from __future__ import annotations

import dataclasses

import torch

from elixir.hardware import Hardware
from elixir.plan import Plan
from elixir.profile import profile
from elixir.search.search import search


def plan(
    model: torch.nn.Module,
    example_batch,
    *,
    hardware: Hardware | None = None,
    world_size: int | None = None,
    compute_dtype: torch.dtype | str = torch.float32,
    prefetch_depth: int = 2,
    loss_fn=None,
) -> Plan:
    """Profile one training step of `model` on `example_batch` (one rank's batch) on the meta
    device, and return the fastest plan that fits `hardware` (measured and cached when not given).

    Raises `PlanDoesNotFitError` (a ValueError) with the bytes needed and available per tier and the
    smallest change that would fit, before anything is allocated."""
    if world_size is None:
        import torch.distributed as dist

        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    prof = profile(model, example_batch, loss_fn, compute_dtype=compute_dtype)
    hardware = hardware or Hardware.measure()
    from elixir.parallel import group_sizes

    best, pred = search(prof, hardware, world_size=world_size, compute_dtype=compute_dtype,
                        prefetch_depth=prefetch_depth, group_sizes=group_sizes(model, world_size))
    return dataclasses.replace(best, use_order=tuple(prof.use_sequence()), predicted=pred.as_dict())
