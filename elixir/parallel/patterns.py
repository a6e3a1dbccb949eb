"""Parallel patterns: over which ranks a parameter's chunks are sharded and reduced.

[Note: parallel patterns]
Every parameter carries a pattern; the memory system sees only the group a pattern gives
(`Pattern.chunk_group`), and chunks never mix parameters of different groups. A pattern is set on the
module that owns the parameters (`module._elixir_pattern`, for its own parameters), so that it survives
`copy.deepcopy` (tensor attributes do not) and the module's operator, which does the pattern's own
communication, finds it there.
- `DataParallel` (the default, nothing set): chunks sharded over every rank of the run (`wrap`'s group);
  gradients averaged over it.
- `ExpertParallel`: the ranks form groups of `ep_size` consecutive ranks (the *expert-parallel* groups,
  which exchange tokens by all-to-all); rank i of each holds experts [i*E/ep, (i+1)*E/ep). The ranks that
  hold the same experts (one per expert-parallel group, every `ep_size`-th rank) form the
  *expert-data-parallel* group, over which those experts' chunks are sharded and reduced.

[Note: expert gradient scale]
Dense gradients are the mean over the world of each rank's gradient of its own loss. An expert's
gradient on the rank that holds it already sums the contributions of every rank of its expert-parallel
group (their tokens came to it by all-to-all, and the gradients went back the same way). Summing that
over the expert-data-parallel group adds the rest of the world, each rank's loss exactly once; dividing by
the world size (not by the group's size) gives the same mean as the dense gradients: the gradient of the
mean loss over the global batch. An expert group of one rank (ep_size = world size) still divides by the
world size. `ChunkGroup.mean_over` carries that divisor to the reduction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from elixir import comm
from elixir.memory.chunk import ChunkGroup

PATTERN_ATTR = "_elixir_pattern"


class Pattern:
    """How a module's parameters are sharded and reduced, and what its operator communicates."""

    def chunk_group(self, world: ChunkGroup) -> ChunkGroup:
        """The group that shards and reduces this pattern's chunks, within the run's `world` group."""
        raise NotImplementedError

    def shard_ranks(self, world_size: int) -> int:
        """How many ranks its chunks are sharded over, in a run of `world_size` ranks (for planning)."""
        raise NotImplementedError

    def __deepcopy__(self, memo) -> Pattern:
        return self  # process groups cannot be copied; a pattern is immutable


class DataParallel(Pattern):
    """Sharded and averaged over the whole run: the default for every parameter."""

    def chunk_group(self, world: ChunkGroup) -> ChunkGroup:
        return world

    def shard_ranks(self, world_size: int) -> int:
        return world_size

    def __repr__(self) -> str:
        return "DataParallel()"


class ExpertParallel(Pattern):
    """Experts spread over an expert-parallel group of `ep_size` ranks (see [Note: parallel patterns])."""

    def __init__(self, num_experts: int, ep_group: ChunkGroup, edp_group: ChunkGroup, world_size: int) -> None:
        self.num_experts = num_experts
        self.ep_group = ep_group  # exchanges tokens; rank i holds experts [i*E/ep, (i+1)*E/ep)
        self.edp_group = edp_group  # holds the same experts: shards and reduces them
        self.world_size = world_size

    @property
    def ep_size(self) -> int:
        return self.ep_group.size

    @property
    def local_experts(self) -> range:
        per = self.num_experts // self.ep_size
        return range(self.ep_group.rank * per, (self.ep_group.rank + 1) * per)

    def chunk_group(self, world: ChunkGroup) -> ChunkGroup:
        if world.size != self.world_size:
            raise ValueError(
                f"the experts were spread for a world of {self.world_size} ranks but elixir.wrap runs over "
                f"{world.size}; call elixir.parallel.expert_parallel and elixir.wrap with the same process group"
            )
        g = self.edp_group
        return ChunkGroup(g.process_group, g.rank, g.size, mean_over=world.size)  # [Note: expert gradient scale]

    def shard_ranks(self, world_size: int) -> int:
        return world_size // self.ep_size

    def __repr__(self) -> str:
        return f"ExpertParallel(num_experts={self.num_experts}, ep_size={self.ep_size}, world_size={self.world_size})"


DATA_PARALLEL = DataParallel()


def check_expert_parallel(num_experts: int, ep_size: int, world_size: int) -> None:
    """ValueError naming the values and the fix unless `ep_size` divides both the experts and the world."""
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"ep_size={ep_size!r}: the expert-parallel size must be a positive int")
    if num_experts % ep_size != 0:
        fits = [d for d in range(1, num_experts + 1) if num_experts % d == 0 and world_size % d == 0]
        raise ValueError(
            f"ep_size={ep_size} does not divide the number of experts ({num_experts}): every rank of an "
            f"expert-parallel group holds the same number of experts; use an ep_size that divides both "
            f"{num_experts} experts and the world size {world_size} (one of {fits})"
        )
    if world_size % ep_size != 0:
        fits = [d for d in range(1, world_size + 1) if num_experts % d == 0 and world_size % d == 0]
        raise ValueError(
            f"ep_size={ep_size} does not divide the world size ({world_size} ranks): the ranks form groups of "
            f"ep_size; use an ep_size that divides both the world size {world_size} and {num_experts} experts "
            f"(one of {fits})"
        )


_groups_cache: dict[tuple[object, int], tuple[ChunkGroup, ChunkGroup]] = {}


def expert_groups(ep_size: int) -> tuple[ChunkGroup, ChunkGroup]:
    """(expert-parallel group, expert-data-parallel group) of this rank, over the default process group.

    Every rank creates every group, in the same order (torch.distributed requires it); the groups are made
    once per process group and size. The expert-parallel group is a group of its own even when it spans the
    world, so that token exchanges never queue behind the dense gradient reductions."""
    if not (dist.is_available() and dist.is_initialized()):
        if ep_size != 1:
            raise ValueError(f"ep_size={ep_size} needs {ep_size} ranks, but torch.distributed is not initialised")
        return ChunkGroup.single(), ChunkGroup.single()
    world, rank = dist.get_world_size(), dist.get_rank()
    key = (dist.group.WORLD, ep_size)  # the object, not its id: a later process group is another key
    if key not in _groups_cache:
        ep = edp = None
        for g in range(world // ep_size):
            ranks = list(range(g * ep_size, (g + 1) * ep_size))
            pg = dist.new_group(ranks) if ep_size > 1 else None
            if rank in ranks:
                ep = ChunkGroup(pg, ranks.index(rank), ep_size)
        for i in range(ep_size):
            ranks = list(range(i, world, ep_size))
            pg = dist.new_group(ranks) if len(ranks) > 1 else None
            if rank in ranks:
                edp = ChunkGroup(pg, ranks.index(rank), len(ranks))
        _groups_cache[key] = (ep, edp)
    return _groups_cache[key]


def patterns_of(model: torch.nn.Module) -> dict[int, Pattern]:
    """id(parameter) -> its pattern, for every parameter whose pattern is not data-parallel."""
    out: dict[int, Pattern] = {}
    for module in model.modules():
        pattern = module.__dict__.get(PATTERN_ATTR)
        if pattern is not None:
            for p in module.parameters(recurse=False):
                out[id(p)] = pattern
    return out


def chunk_groups(model: torch.nn.Module, world: ChunkGroup) -> dict[int, ChunkGroup]:
    """id(parameter) -> the ChunkGroup its chunks are sharded and reduced over (`world` by default).

    This is the one place where `wrap` learns about patterns: it forms one chunk group per distinct
    group here and never packs parameters of two groups into one chunk."""
    out: dict[int, ChunkGroup] = {}
    made: dict[int, ChunkGroup] = {}
    patterns = patterns_of(model)
    for p in model.parameters():
        pattern = patterns.get(id(p), DATA_PARALLEL)
        if id(pattern) not in made:
            made[id(pattern)] = pattern.chunk_group(world)
        out[id(p)] = made[id(pattern)]
        if isinstance(pattern, ExpertParallel):
            declare_global_rows(p, pattern)
    return out


def declare_global_rows(param: torch.Tensor, pattern: ExpertParallel) -> None:
    """Say which rows of the whole [E, ...] tensor this rank's experts are (`param._elixir_global`, read by
    checkpoints: see elixir/checkpoint/layout.py), so that checkpoints name every expert once, by the
    model's own parameter name, and reshard to any world size or ep_size. Set again by every `wrap`:
    tensor attributes do not survive `copy.deepcopy`, module attributes do."""
    param._elixir_global = ((pattern.num_experts, *param.shape[1:]), pattern.local_experts.start)


def pack_keys(model: torch.nn.Module) -> dict[int, int]:
    """id(parameter) -> a key equal for parameters that may share a chunk (the same pattern); for
    planning, where no process group need exist."""
    patterns = patterns_of(model)
    return {id(p): id(patterns[id(p)]) if id(p) in patterns else 0 for p in model.parameters()}


def group_sizes(model: torch.nn.Module, world_size: int) -> dict[str, int]:
    """Parameter name -> ranks its chunks are sharded over, for parameters sharded over fewer ranks than
    `world_size` (what a Plan records in `group_sizes`)."""
    patterns = patterns_of(model)
    out = {}
    for name, p in model.named_parameters():
        if id(p) in patterns:
            ranks = patterns[id(p)].shard_ranks(world_size)
            if ranks != world_size:
                out[name] = ranks
    return out


@torch.no_grad()
def gather_full_values(model: torch.nn.Module, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace, in `values` (name -> this rank's value, as `full_state_dict` gathers it), every
    expert-parallel parameter's local experts with all the experts, gathered over its expert-parallel
    group. Collective: every rank calls it."""
    patterns = patterns_of(model)
    for name, p in model.named_parameters():
        pattern = patterns.get(id(p))
        if not isinstance(pattern, ExpertParallel) or pattern.ep_size == 1 or name not in values:
            continue
        local = values[name]
        full = torch.empty(pattern.ep_size * local.numel(), dtype=local.dtype, device=p.device)
        comm.all_gather(full, local.to(p.device).reshape(-1), pattern.ep_group, what=f"all-gather of {name}'s experts")
        values[name] = full.view(pattern.ep_size * local.shape[0], *local.shape[1:]).to(local.device)
    return values
