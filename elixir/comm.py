"""Collectives on flat 1-D buffers, with the version shims and the failure reports in one place.

Gloo takes only flat 1-D buffers for all-gather and reduce-scatter and rejects PREMUL_SUM/AVG, so
every collective here works on flat buffers and averages by dividing. A group of size one
communicates nothing: the single-process path is the same code with the communication skipped.

[Note: failed collectives]
A rank that dies makes its peers' collectives fail (connection closed); a rank that hangs makes
them time out after the process group's timeout. Either way the peers raise `CollectiveError`,
which names the collective, what it was moving, and the timeout, instead of hanging or printing a
transport error alone. `init_distributed(timeout_s=...)` sets that timeout.

[Note: collectives on gloo]
Gloo's reduce-scatter costs as much as an all-reduce (it reduces the whole buffer on every rank), and
its all-gather stages the data through a buffer of its own. On two ranks, with 8 MiB fp32 chunks on
loopback, swapping halves with one all-to-all is 2.8x faster for the reduce-scatter (then adding this
rank's own half) and 1.5x faster for the all-gather, and gives the same bits (a sum of two is the
same in either order). On more ranks the reduce-scatter is an all-to-all into a buffer of the whole
chunk and a sum over it (1.7x faster on 4 ranks); the all-gather stays gloo's. NCCL's own collectives
are used as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time

import torch
import torch.distributed as dist

from elixir.memory.chunk import ChunkGroup

# torch 2.13 renames the tensor collectives; torch 2.6-2.12 only have the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_gloo_groups: dict[int, bool] = {}

DEFAULT_TIMEOUT_S = 600.0
_timeout_s = DEFAULT_TIMEOUT_S
joined_group = False  # `init_distributed` joined a process group in this process (see elixir/cli: `console`)


class CollectiveError(RuntimeError):
    """A collective failed: a peer rank exited, or did not answer within the timeout."""


def init_distributed(*, timeout_s: float = DEFAULT_TIMEOUT_S, backend: str | None = None) -> ChunkGroup:
    """Join the process group that torchrun (or the caller's environment) describes.

    Under Slurm without torchrun (`srun python train.py`, one task per GPU), the task's SLURM_* variables
    are read as torchrun's (see `slurm_environment`), so chunks can be sharded inside nodes there too.

    With no WORLD_SIZE in the environment (a plain `python` run) this is a single process and
    nothing is initialised. `timeout_s` bounds every collective: a dead or hung peer becomes a
    `CollectiveError` within about that time instead of a hang (gloo). With NCCL the timeout goes to
    NCCL's watchdog, which aborts a process whose collective outlives it (torch's default
    TORCH_NCCL_ASYNC_ERROR_HANDLING): no rank hangs either, but the error is the watchdog's message, not a
    CollectiveError. A blocking wait (TORCH_NCCL_BLOCKING_WAIT=1) would raise instead, at the price of
    the host waiting for every collective, which the copy stream's overlap relies on it not doing.
    """
    global _timeout_s
    if timeout_s <= 0:
        raise ValueError(f"timeout_s={timeout_s} must be positive (seconds a collective may wait for peers)")
    _timeout_s = float(timeout_s)
    if dist.is_initialized():
        return ChunkGroup(dist.group.WORLD, dist.get_rank(), dist.get_world_size())
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ.update(slurm_environment(os.environ))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ChunkGroup.single()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    global joined_group
    joined_group = True
    return ChunkGroup(dist.group.WORLD, dist.get_rank(), dist.get_world_size())


def slurm_environment(env) -> dict[str, str]:
    """The variables torchrun would set, from those of a Slurm task started by `srun` (one task per GPU):
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and GROUP_RANK (the node). MASTER_ADDR and MASTER_PORT
    are the job's to set (the first node's host name and a free port); ValueError naming them otherwise."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise ValueError(
            f"a Slurm job of {env.get('SLURM_NTASKS')} tasks started without torchrun needs {' and '.join(missing)}: "
            "in the sbatch script, export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) "
            "and MASTER_PORT=29500 (or start torchrun with srun, one per node)"
        )
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": env["SLURM_NTASKS"], "LOCAL_RANK": env["SLURM_LOCALID"],
            # "8(x2)": 8 tasks on each of 2 nodes; "8,8" the same written out
            "LOCAL_WORLD_SIZE": per_node.split("(")[0].split(",")[0], "GROUP_RANK": env["SLURM_NODEID"]}


def _fail(what: str, group: ChunkGroup, started: float, err: Exception) -> CollectiveError:
    waited = time.monotonic() - started
    cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return CollectiveError(
        f"{what} over {group.size} ranks failed on rank {group.rank} after {waited:.1f} s: a peer rank exited or "
        f"did not answer within the timeout ({_timeout_s:g} s; set it with init_distributed(timeout_s=...) or "
        f"`elixir train --timeout`). Cause: {cause}"
    )


class Pending:
    """An asynchronous collective in flight; `wait()` finishes it (and names a failure)."""

    __slots__ = ("work", "what", "group", "started", "after", "trailing", "done")

    def __init__(self, work, what: str, group: ChunkGroup, after=None) -> None:
        self.work, self.what, self.group, self.after = work, what, group, after
        self.started = time.monotonic()
        # set by a shared-memory collective asked to `defer_done`: the peers may still be reading this
        # rank's source until it completes (see [Note: shared memory between ranks])
        self.trailing: Pending | None = None
        self.done = False

    def wait(self) -> None:
        """Finish the collective; waiting again does nothing."""
        if self.done:
            return
        try:
            self.work.wait()
        except Exception as e:
            raise _fail(self.what, self.group, self.started, e) from e
        self.done = True
        if self.after is not None:
            # `after` may return the collective that trails this one (see `trailing`); it must not
            # refer to this Pending: a cycle would keep the process group alive past its teardown
            self.trailing = self.after()


def _on_gloo(group: ChunkGroup) -> bool:
    pg = group.process_group
    key = id(pg)
    if key not in _gloo_groups:
        _gloo_groups[key] = dist.get_backend(pg) == "gloo"
    return _gloo_groups[key]


def _pair_splits(rank: int, n: int) -> list[int]:
    """Splits of an all-to-all between two ranks that sends `n` elements to the peer and none to itself."""
    return [0, n] if rank == 0 else [n, 0]


def _through_shared_memory(source: torch.Tensor, group: ChunkGroup, arena, what: str, async_op: bool,
                           read, fallback, defer_done: bool = False) -> Pending | None:
    """A collective by [Note: shared memory between ranks] (elixir/shm.py): `read(wheres)` reads the
    peers' sources once every rank has written its own (wheres[r]: rank r's `arena.locate`);
    `fallback()` runs a socket collective instead when some rank's source is not shared memory (every
    rank sees the same wheres, so every rank takes the same way). With `defer_done` the wait returns
    before the peers have read this rank's source: the caller must wait `pending.trailing` before it
    writes the source again."""
    pg, size = group.process_group, group.size
    wheres = torch.empty(size * 4, dtype=torch.int64)
    started = time.monotonic()
    try:
        work = _all_gather_flat(wheres, torch.tensor(arena.locate(source), dtype=torch.int64), group=pg, async_op=True)
    except Exception as e:
        raise _fail(what, group, started, e) from e

    def finish():
        try:
            rows = wheres.view(size, 4).tolist()
            if all(row[0] >= 0 for row in rows):
                read(rows)
            else:
                fallback()
            # every rank has read: each may write its source again once this completes
            done = dist.all_reduce(torch.zeros(1, dtype=torch.int32), group=pg, async_op=defer_done)
        except Exception as e:
            raise _fail(what, group, started, e) from e
        return Pending(done, f"{what} (the peers' reads)", group) if defer_done else None

    pending = Pending(work, what, group, after=finish)
    if async_op:
        return pending
    pending.wait()
    return pending if defer_done else None


def all_gather(full: torch.Tensor, shard: torch.Tensor, group: ChunkGroup, *, what: str = "all-gather",
               async_op: bool = False, arena=None, defer_done: bool = False) -> Pending | None:
    """Gather every rank's `shard` into `full` (rank r's slice r). Async: returns a `Pending`.
    `arena`: the model's `SharedArena`, used when it serves `group`; `defer_done`: see
    `_through_shared_memory` (without an arena it changes nothing)."""
    if group.size == 1:
        if full.data_ptr() != shard.data_ptr():
            full[: shard.numel()].copy_(shard)
        return None
    started = time.monotonic()
    pg = group.process_group
    if arena is not None and arena.serves(group):
        n, r = shard.numel(), group.rank
        if full[r * n : (r + 1) * n].data_ptr() != shard.data_ptr():
            full[r * n : (r + 1) * n].copy_(shard)

        def read(wheres):
            for p, where in enumerate(wheres):
                if p != r:
                    full[p * n : (p + 1) * n].copy_(arena.peer(p, where, n, shard.dtype))

        def fallback():
            _all_gather_flat(full, shard, group=pg)

        return _through_shared_memory(shard, group, arena, what, async_op, read, fallback, defer_done)
    try:
        if group.size == 2 and _on_gloo(group):  # see [Note: collectives on gloo]
            n, r = shard.numel(), group.rank
            own, peer = full[r * n : (r + 1) * n], full[(1 - r) * n : (2 - r) * n]
            if own.data_ptr() != shard.data_ptr():
                own.copy_(shard)
            splits = _pair_splits(r, n)
            work = dist.all_to_all_single(peer, own, splits, splits, group=pg, async_op=async_op)
        else:
            work = _all_gather_flat(full, shard, group=pg, async_op=async_op)
    except Exception as e:
        raise _fail(what, group, started, e) from e
    return Pending(work, what, group) if async_op else None


class _Done:
    """The work of a collective that finished when it was started."""

    def wait(self) -> None:
        pass


def reduce_scatter_mean(shard_out: torch.Tensor, full: torch.Tensor, group: ChunkGroup, *,
                        what: str = "reduce-scatter", async_op: bool = False, arena=None,
                        defer_done: bool = False) -> Pending | None:
    """Average `full` over the group into this rank's `shard_out` (slice `group.rank`): the sum divided
    by `group.grad_divisor` (the group's size unless the group says otherwise). `arena`: as in
    `all_gather`; the sum is then taken in rank order.

    A group with `replicas` (a chunk sharded inside each node, see [Note: hierarchical sharding] in
    elixir/parallel/nodes.py) sums over the group, then all-reduces the shard over the replicas, then
    divides: every replica ends with the same bits, the mean over both groups together."""
    if group.replicas is not None and group.replicas.size > 1:
        return _reduce_scatter_replicated(shard_out, full, group, what, async_op, arena, defer_done)
    if group.size == 1:
        if shard_out.data_ptr() != full.data_ptr():
            shard_out.copy_(full)
        if group.grad_divisor != 1:
            shard_out.div_(group.grad_divisor)
        return None
    started = time.monotonic()
    pg, r, n, size, divisor = group.process_group, group.rank, shard_out.numel(), group.size, group.grad_divisor
    if arena is not None and arena.serves(group):
        def read(wheres):
            slices = [
                full[r * n : (r + 1) * n] if p == r else arena.peer(p, where, size * n, full.dtype)[r * n : (r + 1) * n]
                for p, where in enumerate(wheres)
            ]
            torch.add(slices[0], slices[1], out=shard_out)
            for more in slices[2:]:
                shard_out.add_(more)
            shard_out.div_(divisor)

        def fallback():
            _reduce_scatter_flat(shard_out, full, group=pg)
            shard_out.div_(divisor)

        return _through_shared_memory(full, group, arena, what, async_op, read, fallback, defer_done)
    try:
        if not _on_gloo(group):
            work = _reduce_scatter_flat(shard_out, full, group=pg, async_op=async_op)

            def finish():
                shard_out.div_(divisor)  # a sum, then a division: one way for every backend (gloo has no AVG)
        elif size == 2:  # see [Note: collectives on gloo]
            splits = _pair_splits(r, n)
            work = dist.all_to_all_single(
                shard_out, full[(1 - r) * n : (2 - r) * n], splits, splits, group=pg, async_op=async_op
            )

            def finish():
                shard_out.add_(full[r * n : (r + 1) * n]).div_(divisor)
        else:
            pieces = torch.empty(size * n, dtype=full.dtype, device=full.device)
            work = dist.all_to_all_single(pieces, full[: size * n], group=pg, async_op=async_op)

            def finish():
                torch.sum(pieces.view(size, n), 0, out=shard_out).div_(divisor)
    except Exception as e:
        raise _fail(what, group, started, e) from e
    if async_op:
        return Pending(work, what, group, after=finish)
    finish()
    return None


def _reduce_scatter_replicated(shard_out, full, group: ChunkGroup, what: str, async_op: bool, arena,
                               defer_done: bool) -> Pending | None:
    """`reduce_scatter_mean` over a group whose shards are replicated: the sum inside the group, then the
    all-reduce of the shard over `group.replicas` when that sum is done, then one division (so that the
    result does not depend on which group divides)."""
    inner = dataclasses.replace(group, mean_over=1, replicas=None)
    replicas, divisor = group.replicas, group.grad_divisor

    def across() -> None:
        all_reduce_sum(shard_out, replicas, what=f"{what}: all-reduce of the shard across nodes")
        if divisor != 1:
            shard_out.div_(divisor)

    pending = reduce_scatter_mean(shard_out, full, inner, what=what, async_op=async_op, arena=arena,
                                  defer_done=defer_done)
    if pending is None:  # finished already (a group of one rank, or a blocking call)
        across()
        return Pending(_Done(), what, group) if async_op else None
    first = pending.after

    def after():
        # `first` may return the peers' reads still in flight (see Pending.trailing): kept as the result
        trailing = first() if first is not None else None
        across()
        return trailing

    pending.after = after
    if not async_op:  # a blocking shared-memory call asked to defer its end: it has run `first` already
        across()
    return pending


def _all_reduce(t: torch.Tensor, group: ChunkGroup, op, what: str) -> torch.Tensor:
    if group.size > 1:
        started = time.monotonic()
        try:
            dist.all_reduce(t, op=op, group=group.process_group)
        except Exception as e:
            raise _fail(what, group, started, e) from e
    return t


def all_reduce_sum(t: torch.Tensor, group: ChunkGroup, what: str = "all-reduce") -> torch.Tensor:
    return _all_reduce(t, group, dist.ReduceOp.SUM, what)


def all_reduce_max(t: torch.Tensor, group: ChunkGroup, what: str = "all-reduce (max)") -> torch.Tensor:
    return _all_reduce(t, group, dist.ReduceOp.MAX, what)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int],
               group: ChunkGroup, *, what: str = "all-to-all") -> None:
    """Send rows `in_splits[r]` of `inp` (in order) to rank r; receive `out_splits[r]` rows from rank r
    into `out`, concatenated in rank order. Rows may be of any shape; splits count rows."""
    if group.size == 1:
        out.copy_(inp)
        return
    started = time.monotonic()
    try:
        dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group.process_group)
    except Exception as e:
        raise _fail(what, group, started, e) from e


def broadcast_object(obj, src: int, group: ChunkGroup, *, what: str = "broadcast"):
    """`obj` from the group's rank `src` to every rank (any picklable value); a dead or hung peer is a
    CollectiveError naming `what`."""
    if group.size == 1:
        return obj
    box = [obj]
    started = time.monotonic()
    try:
        dist.broadcast_object_list(box, src=dist.get_global_rank(group.process_group, src),
                                   group=group.process_group)
    except Exception as e:
        raise _fail(what, group, started, e) from e
    return box[0]


def barrier(group: ChunkGroup, *, what: str = "barrier") -> None:
    """Every rank of the group got here; a dead or hung peer is a CollectiveError naming `what`."""
    if group.size == 1:
        return
    started = time.monotonic()
    try:
        dist.barrier(group=group.process_group)
    except Exception as e:
        raise _fail(what, group, started, e) from e


# --- the world: who this rank is, and decisions every rank takes alike --------------------------------


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size of the process group; (0, 1) when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The world size of the job: the process group's, or before one is initialised, the WORLD_SIZE that
    torchrun (or the caller's environment) gives, which `init_distributed` will join."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_nodes(world_size: int | None = None) -> int:
    """Nodes the job runs on: its world size (`launched_world_size`) over the ranks on this machine (torchrun's
    LOCAL_WORLD_SIZE) when that divides evenly, else 1; also 1 when `world_size` is given and the job's differs
    (a plan made for another run)."""
    world = launched_world_size()
    try:
        local = int(os.environ["LOCAL_WORLD_SIZE"])
    except (KeyError, ValueError):
        return 1
    if world_size is not None and world != world_size:
        return 1
    return world // local if 1 <= local < world and world % local == 0 else 1


def world_group() -> ChunkGroup:
    """Every rank of the job as a group (a group of one when no process group is initialised)."""
    rank, world = rank_and_world()
    return ChunkGroup(dist.group.WORLD, rank, world) if world > 1 else ChunkGroup.single()


def all_gather_object(obj, group: ChunkGroup, *, what: str = "all-gather of objects") -> list:
    """Every rank's `obj` (any picklable value), in rank order; a dead or hung peer is a CollectiveError
    naming `what`."""
    if group.size == 1:
        return [obj]
    out = [None] * group.size
    started = time.monotonic()
    try:
        dist.all_gather_object(out, obj, group=group.process_group)
    except Exception as e:
        raise _fail(what, group, started, e) from e
    return out


def any_rank(flag: bool, group: ChunkGroup, *, device: torch.device | str = "cpu",
             what: str = "all-reduce of a check") -> bool:
    """True on every rank of `group` when `flag` is true on any of them (one all-reduce of a flag on
    `device`, which the group's backend must take): so that every rank raises, or none, and no rank waits
    in a later collective for one that gave up."""
    if group.size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    all_reduce_max(t, group, what)
    return bool(t.item())


def every_rank(flag: bool, group: ChunkGroup, *, device: torch.device | str = "cpu",
               what: str = "all-reduce of a check") -> bool:
    """True on every rank of `group` when `flag` is true on all of them (see `any_rank`)."""
    return not any_rank(not flag, group, device=device, what=what)
