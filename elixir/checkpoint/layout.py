"""Where each parameter's values sit: chunk slots mapped onto the model's own (global) tensors.

A checkpoint never depends on the chunk layout that wrote it: every slot of every chunk says which
range of which *global* tensor it holds, by the model's own parameter name. A parameter is usually
a whole global tensor; a parameter under a parallel pattern may be a block of rows of a larger one
(an expert-parallel rank holds experts [e0, e1) of a [E, ...] weight), which it declares with
`param._elixir_global = (global_shape, first_row)`. Rows are contiguous in the flattened tensor,
so every slot is a flat range `[flat_start, flat_start + numel)` of its global tensor, and resharding
is range intersection.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalSlot:
    name: str  # the model's parameter name (first name of tied parameters)
    global_shape: tuple[int, ...]
    flat_start: int  # where this parameter starts in the flattened global tensor
    numel: int
    chunk_offset: int  # where it starts in its chunk


def global_slots(chunk) -> list[GlobalSlot]:
    out = []
    for s in chunk.slots:
        spec = getattr(s.param, "_elixir_global", None)
        if spec is None:
            shape, start = tuple(s.shape), 0
        else:
            shape, first_row = tuple(spec[0]), int(spec[1])
            row = 1
            for d in shape[1:]:
                row *= d
            start = first_row * row
        out.append(GlobalSlot(s.name, shape, start, s.numel, s.offset))
    return out


def shard_pieces(chunk, group_rank: int | None = None) -> list[tuple[GlobalSlot, int, int]]:
    """The parts of the chunk's slots that lie in one rank's shard (this rank's by default):
    [(slot, chunk_lo, chunk_hi)] in chunk coordinates."""
    g = chunk.group.rank if group_rank is None else group_rank
    lo_s, hi_s = g * chunk.shard_numel, (g + 1) * chunk.shard_numel
    out = []
    for gs in global_slots(chunk):
        lo, hi = max(gs.chunk_offset, lo_s), min(gs.chunk_offset + gs.numel, hi_s)
        if lo < hi:
            out.append((gs, lo, hi))
    return out


def fingerprint(shapes: dict[str, tuple[int, ...]]) -> str:
    """A digest of the model's global parameter names and shapes."""
    text = json.dumps(sorted((n, list(s)) for n, s in shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def model_shapes(chunks) -> dict[str, tuple[int, ...]]:
    """Global parameter shapes of this rank's chunks (all ranks together name every tensor)."""
    return {gs.name: gs.global_shape for c in chunks for gs in global_slots(c)}


def describe_shape_difference(saved: dict, here: dict) -> str | None:
    """The first difference between two {name: shape} tables, in words; None when they agree."""
    for name in saved:
        if name not in here:
            return f"parameter {name!r} is in the checkpoint but not in this model"
    for name, shape in here.items():
        if name not in saved:
            return f"parameter {name!r} of this model is not in the checkpoint"
        if tuple(saved[name]) != tuple(shape):
            return f"parameter {name!r} has shape {list(saved[name])} in the checkpoint and {list(shape)} here"
    return None


def values_of(chunk) -> torch.Tensor:
    """This rank's shard as the checkpoint keeps it: the fp32 master of a trained chunk, else the
    parameter shard in its own dtype."""
    return chunk.master if chunk.master is not None else chunk.shard
