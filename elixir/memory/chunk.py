"""Chunks: flat buffers that hold whole parameters, sharded over a group of ranks.

[Note: chunk layout]
A chunk packs parameters in order of first use, each at an offset aligned to `ALIGN_BYTES`, never
splitting a parameter. Its length is padded to a multiple of its group's size; rank r owns the
contiguous slice r (its *shard*). Padding and alignment gaps hold zeros, receive zero gradients and
stay zero under every elementwise optimizer.

[Note: empty parameters]
Between uses an on-demand parameter holds no memory: its `.data` is a tensor of its own shape and
dtype over a zero-byte storage (autograd checks shapes; a meta tensor is refused by `.data`
assignment). Touching such a tensor crashes the process, so the runtime must make every use find
its chunk gathered (see runtime/hooks.py).

[Note: views kept per block]
An on-demand chunk's parameters become views of a cache block at every fetch. Slicing and viewing
costs ~3 us per parameter on a CPU (more inside a step), and a chunk holds up to tens of parameters,
so each chunk keeps the views it made of each block it was fetched into and binds them again when
it comes back to that block (`.data` assignment takes ~0.2 us). The cache's blocks live as long as
the runtime and are never reallocated, and the views are kept under the block itself (not its
index, which another cache would share), so a kept view never outlives its buffer or points at
memory of another use; a chunk that visits every block keeps a view per parameter per block,
metadata only.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

import torch

ALIGN_BYTES = 64


def pack_offsets(numels: list[int], itemsize: int, align_bytes: int = ALIGN_BYTES) -> tuple[list[int], int]:
    """Offsets (in elements) of tensors packed one after another with aligned starts; and the end."""
    align = max(1, align_bytes // itemsize)
    offsets, end = [], 0
    for n in numels:
        end = -(-end // align) * align
        offsets.append(end)
        end += n
    return offsets, end


def shape_numel(shape) -> int:
    """Elements of a tensor of `shape` (a torch.Size, or a list of ints read from a file)."""
    return math.prod(int(d) for d in shape)


def padded_numel(numel: int, group_size: int) -> int:
    return -(-numel // group_size) * group_size


def empty_like_shape(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of `shape` over a zero-byte storage: no memory (see [Note: empty parameters]).

    The storage is resized to zero (null data pointer) rather than built empty: `set_` on an empty
    storage grows it, and a zero-size allocation has a valid pointer that ops would read past."""
    t = torch.empty(shape, dtype=dtype, device=device)
    t.untyped_storage().resize_(0)
    return t


@dataclass(frozen=True)
class ChunkGroup:
    """The ranks that shard and reduce a set of chunks together."""

    process_group: object | None
    rank: int
    size: int
    mean_over: int = 0
    """Reduced gradients are the sum over the group divided by this many ranks; 0: the group's size (a
    mean over the group). Expert-parallel chunks divide by the world size instead (see elixir/parallel)."""
    replicas: ChunkGroup | None = None
    """The ranks that hold the same shard as this rank (this rank among them), over which a reduced
    gradient shard is all-reduced after the reduce-scatter over the group; None: no other rank holds it.
    A chunk sharded over the ranks of a node is replicated on every node (see [Note: hierarchical
    sharding] in elixir/parallel/nodes.py)."""

    @classmethod
    def single(cls) -> ChunkGroup:
        return cls(None, 0, 1)

    @property
    def grad_divisor(self) -> int:
        return self.mean_over or self.size

    @property
    def counts_once(self) -> bool:
        """Whether this rank speaks for its shard in what sums over every rank of the run (the gradient
        norm, checkpoint files): one replica does, the first one."""
        return self.replicas is None or self.replicas.rank == 0


class ChunkState(enum.Enum):
    """What memory a chunk holds.

    SHARDED:  only this rank's shard exists, at `param_home`; the parameters hold no memory.
    GATHERED: the whole chunk is in `full` (a cache block, or the chunk's own buffer when it is
              resident); the parameters are views of it; the shard is a slice of it or a copy.
    """

    SHARDED = "sharded"
    GATHERED = "gathered"


@dataclass
class ParamSlot:
    """One parameter inside a chunk."""

    name: str
    param: torch.Tensor
    offset: int
    shape: torch.Size
    placeholder: torch.Tensor | None = None
    from_meta: bool = False  # built on the meta device: no values until elixir.load_pretrained

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass(eq=False)
class Chunk:
    """One chunk: its layout, its placement, and the buffers it holds now.

    The chunk owns no communication and no optimizer logic: the runtime moves data into and out of
    these buffers; the chunk keeps the parameters' `.data` consistent with its state.
    """

    index: int
    slots: list[ParamSlot]
    numel: int
    dtype: torch.dtype
    group: ChunkGroup
    resident: bool
    param_home: str
    optim_home: str
    trainable: bool
    optim_group: int | None = None
    state: ChunkState = ChunkState.SHARDED
    shard: torch.Tensor | None = None  # this rank's slice, compute dtype, at param_home
    full: torch.Tensor | None = None  # the gathered chunk, when GATHERED
    block: object | None = None  # the cache block holding it (on-demand chunks only)
    master: torch.Tensor | None = None  # fp32 shard at optim_home (trainable chunks)
    grad_buffer: torch.Tensor | None = None  # pooled fp32 buffer of the chunk's gradient, during backward
    grads_seen: int = 0  # gradient hooks fired into grad_buffer since it was last reduced
    grad_written: list[bool] = field(default_factory=list)  # per slot: has grad_buffer its gradient yet
    slots_written: int = 0
    trainable_slots: int = 0  # parameters that receive gradients
    master_grad_base: torch.Tensor | None = None  # pooled buffer that master.grad is a view of
    pending: object | None = None  # an all-gather in flight into `full` (a prefetch)
    pins: int = 0  # users that need it gathered right now; a pinned chunk is never evicted
    last_use: int = 0  # logical clock of the last use (least-recently-used fallback)
    expected_grads: int | None = None  # gradient hooks per backward, learned in the first one
    block_views: dict = field(default_factory=dict)  # cache block -> the parameters' views of it (`bind`)

    @property
    def shard_numel(self) -> int:
        return self.numel // self.group.size

    @property
    def shard_slice(self) -> slice:
        start = self.group.rank * self.shard_numel
        return slice(start, start + self.shard_numel)

    def bind(self, full: torch.Tensor, block=None) -> None:
        """Make the parameters views of `full` (the whole chunk), which starts `block`'s buffer when given:
        the views of a block are made once and kept (see [Note: views kept per block])."""
        assert full.numel() >= self.numel and full.dtype == self.dtype
        self.full = full
        views = None if block is None else self.block_views.get(block)
        if views is None:
            views = [full[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots]
            if block is not None:
                self.block_views[block] = views
        for s, view in zip(self.slots, views):
            s.param.data = view
        self.state = ChunkState.GATHERED

    def unbind(self) -> None:
        """Drop the gathered chunk: the parameters hold no memory again."""
        assert not self.resident, "a resident chunk stays gathered"
        assert self.pins == 0, f"chunk {self.index} is in use and cannot be released"
        for s in self.slots:
            if s.placeholder is None:
                s.placeholder = empty_like_shape(s.shape, self.dtype, self.full.device)
            s.param.data = s.placeholder
        self.full = None
        self.block = None
        self.state = ChunkState.SHARDED
