"""Nodes: which ranks share a machine, and the groups of a chunk sharded inside each node.

[Note: hierarchical sharding]
A plan shards each chunk over the whole run (`shard_over="world"`, the default) or over the ranks of
each node (`shard_over="node"`): then every node holds the whole chunk, sharded over its own ranks, and
the rank with local rank i on each node holds the same shard i (its *replicas*). A fetch all-gathers
inside the node only; a gradient is reduce-scattered inside the node, then the shard is all-reduced over
the replicas (one rank per node), then divided by the world size: the same mean over every rank as world
sharding, each replica with the same bits (so their masters and optimizer states stay equal, updated
by each replica alike). Per step, the bytes that cross nodes drop from about 2x the chunk per all-gather
and reduce-scatter (world sharding: each rank exchanges all but its node's slices across) to one
all-reduce of a shard, for the price of keeping a node's shard (1/ranks-per-node of the chunk instead of
1/world) on every rank.

What sums over every rank counts a replicated shard once: the gradient norm and the checkpoint files are
taken from the first replica (`ChunkGroup.counts_once`); checks that take a maximum (non-finite
gradients) need no care. Memory is per rank as always: a node chunk's shard is its size over the ranks
of a node. The CPU shared-memory arena (elixir/shm.py) serves the ranks of one node and never spans two.

Nodes are read from torchrun's environment: `LOCAL_WORLD_SIZE` ranks per node, the node's index in
`GROUP_RANK` (torchrun) or `NODE_RANK`, `LOCAL_RANK`; torchrun numbers ranks node by node, so node n holds
ranks [n * L, (n + 1) * L). Every rank's view is gathered and checked alike before any group is made, so
an inconsistent launch is the same ValueError on every rank, not a hang. Expert-parallel chunks shard
inside the node over the ranks of their expert-data-parallel group there (expert-parallel groups are
consecutive ranks, so they lie inside a node when ep_size divides the ranks per node). `Hardware.measure()`
on several nodes times the collectives inside a node and across nodes over the same groups (`node_groups`,
made once per layout).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch.distributed as dist

from elixir import comm
from elixir.memory.chunk import ChunkGroup


@dataclass(frozen=True)
class NodeLayout:
    """How the ranks of a run sit on nodes: `ranks_per_node` consecutive ranks per node."""

    nodes: int
    ranks_per_node: int
    node_rank: int
    local_rank: int

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def node_layout_from_env(world_size: int, rank: int, env=None) -> NodeLayout | None:
    """This rank's view of the nodes from torchrun's environment; None when it says nothing (no
    `LOCAL_WORLD_SIZE`). ValueError naming the variables when they contradict each other or the run."""
    env = os.environ if env is None else env
    if "LOCAL_WORLD_SIZE" not in env:
        return None
    names = {"LOCAL_WORLD_SIZE": env.get("LOCAL_WORLD_SIZE"), "LOCAL_RANK": env.get("LOCAL_RANK"),
             "GROUP_RANK": env.get("GROUP_RANK", env.get("NODE_RANK"))}
    values = {}
    for name, text in names.items():
        try:
            values[name] = int(text)
        except (TypeError, ValueError):
            shown = "GROUP_RANK (or NODE_RANK)" if name == "GROUP_RANK" else name
            raise ValueError(
                f"{shown}={text!r}: nodes are read from torchrun's environment, which sets LOCAL_WORLD_SIZE, "
                "LOCAL_RANK and GROUP_RANK as integers; launch with torchrun (or set them as it does)"
            ) from None
    local, local_rank, node = values["LOCAL_WORLD_SIZE"], values["LOCAL_RANK"], values["GROUP_RANK"]
    if local < 1 or world_size % local:
        raise ValueError(
            f"LOCAL_WORLD_SIZE={local} does not divide the world size {world_size}: sharding inside nodes needs the "
            "same number of ranks on every node (torchrun --nproc-per-node N on each)"
        )
    if not 0 <= local_rank < local or rank != node * local + local_rank:
        raise ValueError(
            f"rank {rank} has GROUP_RANK={node}, LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local}, but torchrun "
            "numbers ranks node by node (rank = GROUP_RANK * LOCAL_WORLD_SIZE + LOCAL_RANK = "
            f"{node * local + local_rank}); launch with torchrun, or set these variables as it does"
        )
    return NodeLayout(world_size // local, local, node, local_rank)


def agreed_node_layout(world: ChunkGroup, env=None) -> NodeLayout:
    """The node layout every rank of `world` (the default process group) agrees on, for a plan that shards
    chunks inside nodes: collective. ValueError on every rank alike when the environment is missing or
    inconsistent on any rank."""
    if world.size == 1:
        return NodeLayout(1, 1, 0, 0)
    try:
        mine = ("ok", node_layout_from_env(world.size, world.rank, env))
    except ValueError as e:
        mine = ("error", str(e))
    everyone: list = [None] * world.size
    started = time.monotonic()
    try:
        dist.all_gather_object(everyone, mine, group=world.process_group)
    except Exception as e:
        raise comm._fail("all-gather of the node layout", world, started, e) from e
    for r, (kind, value) in enumerate(everyone):
        if kind == "error":
            raise ValueError(f"rank {r}: {value}")
        if value is None:
            raise ValueError(
                f"the plan shards chunks inside nodes (shard_over='node') but rank {r} has no LOCAL_WORLD_SIZE in "
                "its environment: launch with torchrun (it sets LOCAL_WORLD_SIZE, LOCAL_RANK and GROUP_RANK), or "
                "use a plan with shard_over='world'"
            )
    shapes = {(v.nodes, v.ranks_per_node) for _, v in everyone}
    if len(shapes) > 1:
        raise ValueError(
            f"the ranks disagree on the nodes (nodes, ranks per node): {sorted(shapes)}; every node must run the "
            "same number of ranks (torchrun --nproc-per-node N on each)"
        )
    return everyone[world.rank][1]


_groups_cache: dict[tuple, dict[tuple[int, ...], tuple[ChunkGroup, ChunkGroup]]] = {}


def node_groups(world: ChunkGroup, layout: NodeLayout, base: dict[int, ChunkGroup]) -> dict[int, ChunkGroup]:
    """For each chunk group of `base` (id(group) -> group: the world, expert-data-parallel groups), the
    group that shards the same chunks inside this rank's node, with its `replicas` across nodes.
    Collective over `world`: every rank makes every group, in the same order, once per layout."""
    if layout.nodes == 1:  # one node: sharding inside it is sharding over the run
        return dict(base)
    rank = world.rank
    mine = {gid: _ranks_of(g, world) for gid, g in base.items()}
    everyone: list = [None] * world.size
    started = time.monotonic()
    try:
        dist.all_gather_object(everyone, sorted(set(mine.values())), group=world.process_group)
    except Exception as e:
        raise comm._fail("all-gather of the chunk groups to shard inside nodes", world, started, e) from e
    all_bases = sorted({tuple(r) for ranks in everyone for r in ranks})
    made = _groups_cache.setdefault((world.process_group, layout), {})
    for ranks in all_bases:  # the same order on every rank
        if ranks in made:
            continue
        per_node = [[r for r in ranks if r // layout.ranks_per_node == n] for n in range(layout.nodes)]
        if len({len(p) for p in per_node}) != 1:
            raise ValueError(
                f"a chunk group over ranks {list(ranks)} has a different number of ranks on each node "
                f"({[len(p) for p in per_node]}), so it cannot be sharded inside nodes; with expert parallelism "
                f"use an ep_size that divides the ranks per node ({layout.ranks_per_node}), or shard_over='world'"
            )
        inside = [_new_group(p) for p in per_node]
        across_ranks = [[p[i] for p in per_node] for i in range(len(per_node[0]))]
        across = [_new_group(a) for a in across_ranks]
        if rank in ranks:
            n, i = layout.node_rank, per_node[layout.node_rank].index(rank)
            replicas = ChunkGroup(across[i], n, layout.nodes)
            made[ranks] = (ChunkGroup(inside[n], i, len(per_node[n]), replicas=replicas), replicas)
    out = {}
    for gid, g in base.items():
        node_group = made[mine[gid]][0]
        # the mean is over the run, as the world group's (or the expert pattern's) divisor says
        out[gid] = ChunkGroup(node_group.process_group, node_group.rank, node_group.size,
                              mean_over=g.grad_divisor, replicas=node_group.replicas)
    return out


def _new_group(ranks: list[int]):
    return dist.new_group(ranks) if len(ranks) > 1 else None


def _ranks_of(group: ChunkGroup, world: ChunkGroup) -> tuple[int, ...]:
    if group.size == 1:
        return (world.rank,)
    if group.process_group is world.process_group:
        return tuple(range(world.size))
    return tuple(dist.get_process_group_ranks(group.process_group))
