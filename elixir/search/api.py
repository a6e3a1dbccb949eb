"""elixir.plan(): profile a model on the meta device, then search the fastest plan that fits."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from elixir import comm
from elixir.hardware import Hardware
from elixir.plan import Plan
from elixir.profile import Profile, profile
from elixir.search.block import BlockInputs, compute_scale
from elixir.search.cost import Prediction
from elixir.search.search import CHECKPOINT_OPTIONS, search


def plan(
    model: torch.nn.Module,
    example_batch,
    *,
    hardware: Hardware | None = None,
    world_size: int | None = None,
    compute_dtype: torch.dtype | str = torch.float32,
    prefetch_depth: int = 2,
    loss_fn=None,
    tokens_per_step: int | None = None,
    nodes: int = 1,
    shard_over: str | None = None,
) -> Plan:
    """Profile one training step of `model` on `example_batch` (one rank's batch) on the meta
    device, and return the fastest plan that fits `hardware` (measured and cached when not given).

    `tokens_per_step`: the global batch, in tokens per optimizer step over all ranks. Given, the planner
    also chooses the micro-batch (`Plan.micro_batch_size` sequences per rank), the accumulation steps
    (`Plan.grad_accum`) and activation checkpointing (`Plan.checkpoint_every`, which `elixir.wrap` applies);
    the example batch then only gives the sequence length (its inputs are `(batch, seq_len)` tensors). The
    training loop feeds `grad_accum` micro-batches of `micro_batch_size` sequences per optimizer step.
    Without it, the example batch is the micro-batch, one per step, without checkpointing.

    `nodes`: the nodes the `world_size` ranks run on (as many on each); with more than one the search also
    chooses whether chunks are sharded over the world or inside each node (`ChunkPlan.shard_over`);
    `shard_over` ("world" or "node") fixes that choice instead.

    Raises `PlanDoesNotFitError` (a ValueError) with the bytes needed and available per tier and the
    smallest change that would fit, before anything is allocated."""
    if world_size is None:
        world_size = comm.rank_and_world()[1]
    hardware = hardware or Hardware.measure()
    if tokens_per_step is not None:
        return plan_batch(model, example_batch, hardware=hardware, world_size=world_size,
                          compute_dtype=compute_dtype, prefetch_depth=prefetch_depth, loss_fn=loss_fn,
                          tokens_per_step=tokens_per_step, nodes=nodes, shard_over=shard_over).plan
    from elixir.parallel import group_sizes

    with BlockInputs(model, loss_fn) as block:
        prof = profile(model, example_batch, loss_fn, compute_dtype=compute_dtype)
    groups = group_sizes(model, world_size)
    hardware = timed_block(block, hardware, compute_dtype, groups)
    best, pred = search(prof, hardware, world_size=world_size, compute_dtype=compute_dtype,
                        prefetch_depth=prefetch_depth, group_sizes=groups,
                        checkpointed=checkpointed_regions(model), nodes=nodes, shard_over=shard_over)
    return dataclasses.replace(best, use_order=tuple(prof.use_sequence()),
                               predicted={**pred.as_dict(), "batch_tokens": batch_tokens(example_batch),
                                          "compute_scale": hardware.compute_scale})


def timed_block(block: BlockInputs, hardware: Hardware, compute_dtype, groups: dict) -> Hardware:
    """`hardware` with the compute scale of the model whose first block `block` recorded, where the record
    describes this device and has none yet (see [Note: one block of the model, timed] in
    elixir/search/block.py)."""
    if not hardware.measured_here or hardware.compute_scale != 1.0:
        return hardware
    return hardware.with_compute_scale(compute_scale(block, hardware, compute_dtype=compute_dtype,
                                                     expert_parallel=bool(groups)))


def batch_tokens(batch) -> int:
    """Elements of a batch's first input tensor (tokens, for language models): what a plan was made for."""
    if isinstance(batch, torch.Tensor):
        return batch.numel()
    for value in (batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()):
        if isinstance(value, torch.Tensor):
            return value.numel()
    return 0


def checkpointed_regions(model: torch.nn.Module) -> list[list[str]]:
    """The parameter names (first names, as profiles give them) of each block of `model` that recomputes its
    forward in backward now: the runtime keeps such a block's chunks gathered until its backward has run
    (see [Note: pins] in elixir/runtime/state.py), so a plan's cache must hold them together."""
    from elixir.models.checkpointing import checkpointed_blocks, transformer_blocks

    blocks = transformer_blocks(model)
    first = {id(p): n for n, p in model.named_parameters()}
    return [[first[id(p)] for p in blocks[i].parameters()] for i in checkpointed_blocks(model)]


@dataclass(frozen=True)
class BatchPlan:
    """What a batch search found: the plan, its prediction for a whole step, and the profile of one
    micro-batch under the chosen checkpointing (scaled to the chosen micro-batch)."""

    plan: Plan
    prediction: Prediction
    profile: Profile
    profiles_traced: int
    """How many checkpointing options were traced before the search stopped."""


def plan_batch(
    model: torch.nn.Module,
    example_batch,
    *,
    hardware: Hardware,
    tokens_per_step: int,
    world_size: int = 1,
    compute_dtype: torch.dtype | str = torch.float32,
    prefetch_depth: int = 2,
    loss_fn=None,
    nodes: int = 1,
    shard_over: str | None = None,
) -> BatchPlan:
    """`elixir.plan(..., tokens_per_step=...)` with what the search saw: see `plan`.

    Traces one sequence of the example batch per checkpointing option (`CHECKPOINT_OPTIONS`), each only when
    the search gets to it, and restores the model's own checkpointing afterwards."""
    from elixir.models.checkpointing import checkpointing, transformer_blocks
    from elixir.parallel import group_sizes

    one, seq_len = _one_sequence(example_batch)
    traced: dict[int, Profile] = {}
    block = BlockInputs(model, loss_fn)

    def trace(every: int) -> Profile:
        if every not in traced:
            with checkpointing(model, every), (block if every == 0 else contextlib.nullcontext()):
                traced[every] = profile(model, one, loss_fn, compute_dtype=compute_dtype)
        return traced[every]

    # a model without blocks to checkpoint has only the option without checkpointing
    options = [k for k in CHECKPOINT_OPTIONS if k] if transformer_blocks(model) else []
    first = trace(0)
    groups = group_sizes(model, world_size)
    hardware = timed_block(block, hardware, compute_dtype, groups)
    best, pred = search(first, hardware, world_size=world_size, compute_dtype=compute_dtype,
                        prefetch_depth=prefetch_depth, group_sizes=groups,
                        tokens_per_step=tokens_per_step, seq_len=seq_len, profiled_sequences=1,
                        checkpoint_profiles={k: functools.partial(trace, k) for k in options}, nodes=nodes,
                        shard_over=shard_over)
    chosen = trace(best.checkpoint_every)
    best = dataclasses.replace(best, use_order=tuple(chosen.use_sequence()),
                               predicted={**pred.as_dict(), "batch_tokens": best.micro_batch_size * seq_len,
                                          "compute_scale": hardware.compute_scale})
    return BatchPlan(best, pred, chosen.scaled(best.micro_batch_size), profiles_traced=len(traced))


def _one_sequence(example_batch) -> tuple[Any, int]:
    """The example batch cut to its first sequence, and its sequence length (dimension 1 of its inputs)."""
    tensors = ([example_batch] if isinstance(example_batch, torch.Tensor) else
               [v for v in example_batch.values() if isinstance(v, torch.Tensor)]
               if isinstance(example_batch, Mapping) else [])
    shaped = [t for t in tensors if t.dim() >= 2]
    if not shaped:
        raise ValueError(
            "with tokens_per_step the example batch gives the sequence length: pass (batch, seq_len) tensors, "
            "as a tensor or a dict of them"
        )
    batch, seq_len = shaped[0].shape[:2]
    if isinstance(example_batch, torch.Tensor):
        return example_batch[:1], seq_len
    one = {k: v[:1] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch else v
           for k, v in example_batch.items()}
    return one, seq_len
