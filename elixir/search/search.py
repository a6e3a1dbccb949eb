"""The search: the fastest plan that fits both memories, by the cost model.

Per chunk size (from the largest parameter up to 256 MiB), the search walks four levels of
placement, each moving more model data off the device, and within a level moves as few chunks as
needed (memory falls monotonically with the count, time grows):
  L0 every chunk resident, optimizer on the device;
  L1 the optimizer (fp32 master, gradient shard, states) of k chunks on the host;
  L2 every optimizer on the host, k chunks gathered on demand (their shards on the device);
  L3 every chunk on demand, the shards of k chunks on the host;
  L4 when even L3 overflows the host: all shards on the host, the optimizer of k chunks back on the device;
  L5 when that overflows the host too and the machine has a scratch disk: all shards on the host, the
     optimizer (fp32 master and states) of k chunks on disk (see [Note: the disk tier] in
     elixir/memory/disk.py);
with a few cache sizes for levels that use the cache. Every candidate is simulated; the fastest
that fits wins. Nothing is allocated: a candidate is a Plan and a replay of the profile.

Given tokens per step, the search also chooses the micro-batch, the accumulation steps and activation
checkpointing, running the placement search for each point it tries: see [Note: searching the batch].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace

from elixir.hardware import Hardware
from elixir.plan import DTYPES, ChunkPlan, Plan, dtype_name, pack_chunks
from elixir.profile import Profile
from elixir.search import cost
from elixir.search.cost import Prediction, simulate

# share of each memory the plan may fill: the CUDA context, allocator slack and fragmentation,
# and everything that is not model data or activations take the rest
DEVICE_MARGIN = 0.9
HOST_MARGIN = 0.85
DISK_MARGIN = 0.95  # of the scratch folder's free space: filesystem metadata, and other files growing meanwhile
_MIB = 2**20


class PlanDoesNotFitError(ValueError):
    """No plan fits the memories at hand."""


def _gib(n: float) -> str:
    """Bytes for people: GiB, or MiB / KiB below one (small models in tests, CPU budgets)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 2**10:.2f} KiB"


def _chunk_sizes(largest: int, itemsize: int) -> list[int]:
    sizes = {largest}
    for mib in (8, 32, 64, 128, 256):
        numel = mib * _MIB // itemsize
        if numel >= largest:
            sizes.add(numel)
    return sorted(sizes)


def _checkpointed_regions(order: list[str], checkpoint_every: int) -> list[list[str]]:
    """The parameters of each checkpointed block, by their names: a block is what one index of a module list
    holds (`h.3`, `model.layers.3`), in order of first use, and every `checkpoint_every`-th from the first is
    checkpointed, as `elixir.models.apply_checkpointing` does.

    The runtime keeps a recomputed block's chunks gathered until its backward has run (see [Note: pins] in
    elixir/runtime/state.py), so the cache must hold all of them at once: on the tiny GPT and Llama of
    tests/test_batch_plan.py the fewest blocks that train are the most chunks of one such block."""
    if not checkpoint_every:
        return []
    blocks: dict[str, list[str]] = {}
    for name in order:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is not None:
            blocks.setdefault(".".join(parts[: index + 1]), []).append(name)
    return [names for i, names in enumerate(blocks.values()) if i % checkpoint_every == 0]


def _ops_chunks(profile: Profile, chunk_of: dict[str, int]) -> int:
    """Most distinct chunks one operator reads: the cache must hold them together."""
    most = 1
    for op in profile.ops:
        most = max(most, len({chunk_of[n] for n in op.params if n in chunk_of}))
    return most


def search(
    profile: Profile,
    hardware: Hardware,
    *,
    world_size: int = 1,
    compute_dtype="float32",
    prefetch_depth: int = 2,
    group_sizes: dict[str, int] | None = None,
    tokens_per_step: int | None = None,
    seq_len: int | None = None,
    profiled_sequences: int = 1,
    checkpoint_profiles: Mapping[int, Profile | Callable[[], Profile]] | None = None,
    checkpointed: list[list[str]] | None = None,
    nodes: int = 1,
    shard_over: str | None = None,
) -> tuple[Plan, Prediction]:
    """The fastest plan that fits `hardware`'s device and host memory, and its prediction.

    `nodes`: the nodes the `world_size` ranks run on. With more than one, every placement is tried with its
    chunks sharded over the world and inside each node (see [Note: hierarchical sharding] in
    elixir/parallel/nodes.py), the network priced by `cost.Network`; `shard_over` fixes one of the two.

    `checkpointed`: the parameter names of each block the model itself recomputes in backward (activation
    checkpointing applied before planning): the cache must hold each such block's chunks at once.

    `group_sizes`: parameters sharded over fewer ranks than the world (expert parallel), as
    `Plan.group_sizes`; they are packed into chunks of their own.

    Without `tokens_per_step`, `profile` is one rank's micro-batch and the step is that one micro-batch.
    With it, the batch is searched too (see [Note: searching the batch]): `tokens_per_step` is the global
    batch (tokens per optimizer step over all ranks) in sequences of `seq_len` tokens; `profile` is a step
    of `profiled_sequences` such sequences without activation checkpointing, and `checkpoint_profiles` maps a
    checkpointing option k (every k-th block) to the same step with it, or to a function that traces it (called
    only if the search gets that far). The plan says the micro-batch, accumulation and checkpointing chosen."""
    if tokens_per_step is None:
        if seq_len is not None or checkpoint_profiles:
            raise ValueError(
                "seq_len and checkpoint_profiles only apply to a batch search; pass tokens_per_step too, "
                "or leave them out to plan the profiled micro-batch as it is"
            )
        space = _Space(hardware, world_size, compute_dtype, prefetch_depth, group_sizes, checkpointed,
                       nodes=nodes, shard_over=shard_over)
        best, smallest, _ = space.place(profile)
        if best is None:
            raise _infeasible(smallest, space.device_budget, space.host_budget, world_size, space=space,
                              profile=profile)
        return best
    return _search_batch(
        profile, hardware, world_size=world_size, compute_dtype=compute_dtype, prefetch_depth=prefetch_depth,
        group_sizes=group_sizes, tokens_per_step=tokens_per_step, seq_len=seq_len,
        profiled_sequences=profiled_sequences, checkpoint_profiles=checkpoint_profiles or {}, nodes=nodes,
        shard_over=shard_over,
    )


# [Note: the layout per chunk]
# On several nodes each chunk is sharded over the world or inside its node (see [Note: hierarchical sharding]
# in elixir/parallel/nodes.py). Node sharding keeps gathers and reduce-scatters off the link between nodes but
# holds `nodes` times the shard per rank (parameters, master, optimizer states, on the device or the host).
# The placement levels below move the first k chunks (in order of use) one step down (optimizer to the host,
# off residency, shard to the host); the layouts tried say what the moved chunks and the others are sharded
# over: the same for all (world or node), or the moved ones inside nodes and the others over the world, or
# the reverse. A mixed layout wins where neither plain one fits well: with the host short of room for node
# shards, node-sharding the chunks whose states live on the host costs more host memory than the world
# layout, so only some can be; with the device short, the chunks left resident are world-sharded to make
# room. Moving a chunk then also changes its sharding, so memory need not fall with k: for a mixed layout
# both ends of the range of k that fits are tried (`fitting_ends`). A greedy pass that flipped single chunks
# of the fastest plan found nothing: the memory a flip frees is only worth something once the placement
# search spends it.
class _Space:
    """The placements of one model on one machine: what `search` walks for one profiled micro-batch."""

    def __init__(self, hardware: Hardware, world_size: int, compute_dtype, prefetch_depth: int,
                 group_sizes: dict[str, int] | None, checkpointed: list[list[str]] | None = None, *,
                 nodes: int = 1, shard_over: str | None = None) -> None:
        if not isinstance(nodes, int) or nodes < 1 or world_size % nodes:
            raise ValueError(f"nodes={nodes!r} must be a positive int that divides world_size={world_size}")
        if shard_over not in (None, "world", "node"):
            raise ValueError(f"shard_over={shard_over!r}: use 'world', 'node', or None to choose")
        self.nodes = nodes
        # the layouts tried, as (what the moved chunks are sharded over, what the others are): sharding inside
        # nodes only where there are several; see [Note: the layout per chunk]
        if shard_over or nodes == 1:
            self.overs = [(shard_over or "world",) * 2]
        else:
            self.overs = [("world", "world"), ("node", "node"), ("node", "world"), ("world", "node")]
        self.hardware = hardware
        self.checkpointed = [list(r) for r in checkpointed or ()]  # blocks the model recomputes itself
        self.world_size = world_size
        self.prefetch_depth = prefetch_depth
        self.group_sizes = dict(group_sizes or {})
        self.dtype_key = dtype_name(compute_dtype)
        self.itemsize = DTYPES[self.dtype_key].itemsize
        self.device_budget = int(hardware.device_bytes * DEVICE_MARGIN)
        self.host_budget = int(hardware.host_bytes * HOST_MARGIN)
        self.disk_budget = int(hardware.disk_bytes * DISK_MARGIN)

    def fits(self, pred: Prediction) -> bool:
        return (pred.device_bytes_peak <= self.device_budget and pred.host_bytes_peak <= self.host_budget
                and pred.model_disk_bytes <= self.disk_budget)

    def _layouts(self, profile: Profile, checkpoint_every: int = 0):
        """(chunk size, parameter names per chunk, fewest cache blocks) for every chunk size tried."""
        order = profile.param_order()
        named = [(n, SimpleNamespace(numel=lambda v=profile.param_numels[n]: v)) for n in order]
        # chunks never mix groups, nor frozen parameters with trained ones (as wrap's chunks do not)
        trained = cost.trainable_names(profile)
        group_of = {id(p): (self.group_sizes.get(n, self.world_size), trained is None or n in trained)
                    for n, p in named}
        largest = max(profile.param_numels.values())
        regions = _checkpointed_regions(order, checkpoint_every) + [
            [n for n in r if n in profile.param_numels] for r in self.checkpointed]
        for chunk_numel in _chunk_sizes(largest, self.itemsize):
            names = [tuple(c) for c in pack_chunks(named, group_of, chunk_numel, self.itemsize)]
            chunk_of = {n: i for i, c in enumerate(names) for n in c}
            fewest = max([_ops_chunks(profile, chunk_of) + 1] + [len({chunk_of[n] for n in r}) for r in regions])
            yield chunk_numel, names, min(len(names), fewest)

    def _over(self, names: tuple[str, ...], over: str) -> str:
        """`over` for a chunk, except a chunk whose group does not spread evenly over the nodes (expert
        parallel with an ep_size that does not divide the ranks per node): the world."""
        ranks = self.group_sizes.get(names[0], self.world_size)
        return over if ranks % self.nodes == 0 else "world"

    def _base(self, profile: Profile, chunk_numel: int, names, over: str = "world", **batch) -> Plan:
        return Plan(
            chunks=tuple(ChunkPlan(params=c, resident=True, shard_over=self._over(c, over)) for c in names),
            chunk_numel=chunk_numel,
            cache_blocks=0,
            prefetch_depth=self.prefetch_depth,
            compute_dtype=self.dtype_key,
            world_size=self.world_size,
            param_shapes=dict(profile.param_shapes),
            group_sizes=self.group_sizes,
            nodes=self.nodes,
            overlap=cost.overlap_pays(self.hardware),
            **batch,
        )

    def least_model_device_bytes(self, profile: Profile, checkpoint_every: int = 0) -> int:
        """Model data on the device under the plan that keeps the least there (every chunk on demand into
        the fewest cache blocks, shards and optimizers on the host), over the chunk sizes: with the
        activations, a floor for the device memory of any plan. Memory only, no replay of the step."""
        least = None
        for chunk_numel, names, min_blocks in self._layouts(profile, checkpoint_every):
            base = self._base(profile, chunk_numel, names)
            plan = dataclasses.replace(base, cache_blocks=min_blocks, chunks=tuple(
                ChunkPlan(params=c, resident=False, param_home="host", optim_home="host") for c in names))
            device = self.memory_only(profile, plan).model_device_bytes
            least = device if least is None else min(least, device)
        return least

    def memory_only(self, profile: Profile, plan: Plan) -> Prediction:
        """The memory `simulate` predicts for `plan`, computed the same way without replaying the step; its
        times are infinite."""
        chunks = cost.layout(plan, profile)
        chunk_of = {n: c.index for c in chunks for n in c.names}
        grads = cost.gradients(plan, chunks, cost.grad_arrivals(profile, chunks, chunk_of))
        device, host, disk = cost.memory(plan, chunks, grads, gpu=self.hardware.device_type != "cpu")
        activations = profile.peak_activation_bytes
        inf = float("inf")
        return Prediction(
            step_s=inf, compute_s=inf, stall_s=inf, comm_busy_s=inf, optim_s=inf, fetches=0,
            device_bytes_peak=device + activations, host_bytes_peak=host, model_device_bytes=device,
            model_host_bytes=host, activation_bytes=activations, flops=profile.total_flops, model_disk_bytes=disk,
        )

    def compute_floor_s(self, profile: Profile, grad_accum: int = 1) -> float:
        """Compute time of a step of `grad_accum` micro-batches of `profile` with every chunk resident: the
        operators, their launches and the gradients' copies into their buffers, no fetch to wait for, and not
        the adds of later micro-batches into the held gradients (a plan with its optimizer on the host makes
        them on the worker). No plan of this step computes in less (up to the chunks' padding), nor one with
        more operators (recomputation) or more, smaller micro-batches of the same sequences (the same FLOPs,
        more launches)."""
        chunk_numel, names, _ = next(self._layouts(profile))
        # every micro-batch computes the same: one replay serves (what `simulate` adds up for grad_accum)
        return grad_accum * simulate(profile, self._base(profile, chunk_numel, names), self.hardware).compute_s

    def place(self, profile: Profile, **batch):
        """(fastest, smallest, leanest): the fastest placement of `profile` that fits (None if none does), the
        one with the least device memory seen, and among those that fit the device the one with the least
        host memory (None if none does). `batch`: the plan's micro_batch_size, grad_accum and
        checkpoint_every."""
        best: tuple[Plan, Prediction] | None = None
        smallest: tuple[Plan, Prediction] | None = None  # the least device memory seen, for the error
        leanest: tuple[Plan, Prediction] | None = None  # the least host memory beside a device that fits
        fits = self.fits
        device_budget = self.device_budget

        best_layout = None  # (chunk size, overs) of `best`

        def consider(plan: Plan, layout=None) -> Prediction:
            nonlocal best, smallest, leanest, best_layout
            pred = self.memory_only(profile, plan)  # no replay of the step for a plan that does not fit
            if fits(pred):
                pred = simulate(profile, plan, self.hardware)
            if smallest is None or (pred.device_bytes_peak, pred.host_bytes_peak) < (
                smallest[1].device_bytes_peak,
                smallest[1].host_bytes_peak,
            ):
                smallest = (plan, pred)
            if pred.device_bytes_peak <= device_budget and (leanest is None or (
                    pred.host_bytes_peak, pred.device_bytes_peak) < (
                    leanest[1].host_bytes_peak, leanest[1].device_bytes_peak)):
                leanest = (plan, pred)
            if fits(pred):
                if best is None or pred.step_s < best[1].step_s:
                    best, best_layout = (plan, pred), layout
            return pred

        def fitting_ends(level, n: int) -> None:
            """Both ends of the k (of `n`) whose plans `level(k)` fit, for a mixed layout: moving a chunk
            also changes what it is sharded over, so memory need not fall with k (node sharding holds more
            per rank); the ks that fit are taken to be one interval, found from a scan of powers of two."""
            ks = sorted({1, n} | {2**j for j in range(n.bit_length()) if 2**j < n}
                        | {n - 2**j for j in range(n.bit_length()) if 0 < n - 2**j})
            fit = [k for k in ks if fits(consider(*level(k)))]
            if not fit:
                return
            lo, hi = max([k for k in ks if k < fit[0]], default=0) + 1, fit[0]
            while lo < hi:  # the smallest k that fits
                mid = (lo + hi) // 2
                if fits(consider(*level(mid))):
                    hi = mid
                else:
                    lo = mid + 1
            lo, hi = fit[-1], min([k for k in ks if k > fit[-1]], default=n + 1) - 1
            while lo < hi:  # the largest
                mid = (lo + hi + 1) // 2
                if fits(consider(*level(mid))):
                    lo = mid
                else:
                    hi = mid - 1

        layouts = [(layout, over) for layout in self._layouts(profile, batch.get("checkpoint_every", 0))
                   for over in self.overs]
        for (chunk_numel, names, min_blocks), (moved_over, kept_over) in layouts:
            base = self._base(profile, chunk_numel, names, kept_over, **batch)
            here = (chunk_numel, moved_over, kept_over)
            mixed = moved_over != kept_over

            def this_layout(here=here) -> bool:
                return best_layout == here

            def level(k: int, lvl: int, blocks: int, names=names, base=base, here=here) -> tuple[Plan, tuple]:
                """The plan with the first k chunks moved down to level `lvl`, and its layout (`here`)."""
                chunks = []
                for i, c in enumerate(names):
                    moved = i < k
                    if lvl == 1:
                        choice = dict(resident=True, param_home="device", optim_home="host" if moved else "device")
                    elif lvl == 2:
                        choice = dict(resident=not moved, param_home="device", optim_home="host")
                    elif lvl == 3:
                        choice = dict(resident=False, param_home="host" if moved else "device", optim_home="host")
                    elif lvl == 4:  # every shard on the host, the optimizer of k chunks back on the device
                        choice = dict(resident=False, param_home="host", optim_home="device" if moved else "host")
                    else:  # every shard on the host, the optimizer of k chunks on disk
                        choice = dict(resident=False, param_home="host", optim_home="disk" if moved else "host")
                    over = self._over(c, here[1] if moved else here[2])
                    chunks.append(ChunkPlan(params=c, shard_over=over, **choice))
                uses_cache = any(not c.resident for c in chunks)
                return dataclasses.replace(base, chunks=tuple(chunks), cache_blocks=blocks if uses_cache else 0), here

            # a mixed layout's base (no chunk moved) is the plain layout of its other chunks, tried already
            if not mixed and fits(consider(base, here)):
                continue  # all resident fits: nothing slower at this chunk size can win on memory
            for lvl in (1, 2, 3):
                block_options = [0] if lvl == 1 else sorted({min_blocks, min_blocks + 2, 2 * min_blocks + 2})
                for blocks in block_options:
                    blocks = min(blocks, len(names)) if lvl > 1 else 0
                    if mixed:
                        fitting_ends(lambda k, lvl=lvl, blocks=blocks: level(k, lvl, blocks), len(names))
                        continue
                    # smallest k that fits: memory falls monotonically with k
                    lo, hi = 1, len(names)
                    if not fits(consider(*level(hi, lvl, blocks))):
                        continue
                    while lo < hi:
                        mid = (lo + hi) // 2
                        if fits(consider(*level(mid, lvl, blocks))):
                            hi = mid
                        else:
                            lo = mid + 1
                    consider(*level(lo, lvl, blocks))
                if best is not None and this_layout():
                    break  # a cheaper level already fits at this chunk size and layout
            else:
                # L4: when the host is what overflows, give the device's spare room to optimizer states:
                # the largest k whose device memory still fits (device memory grows with k, host falls)
                for blocks in sorted({min_blocks, min_blocks + 2}):
                    blocks = min(blocks, len(names))
                    lo, hi = 0, len(names)
                    while lo < hi:
                        mid = (lo + hi + 1) // 2
                        if consider(*level(mid, 4, blocks)).device_bytes_peak <= device_budget:
                            lo = mid
                        else:
                            hi = mid - 1
                    consider(*level(lo, 4, blocks))
                if self.disk_budget and (best is None or not this_layout()):
                    # L5: the host still overflows: the optimizer of the fewest chunks that makes it fit on disk
                    for blocks in sorted({min_blocks, min_blocks + 2}):
                        blocks = min(blocks, len(names))
                        lo, hi = 1, len(names)
                        if not fits(consider(*level(hi, 5, blocks))):
                            continue
                        while lo < hi:
                            mid = (lo + hi) // 2
                            if fits(consider(*level(mid, 5, blocks))):
                                hi = mid
                            else:
                                lo = mid + 1
                        consider(*level(lo, 5, blocks))
        return best, smallest, leanest


# [Note: searching the batch]
# Given tokens per optimizer step, the micro-batch b (sequences per rank), the accumulation steps (the rank's
# sequences / b) and activation checkpointing trade activation memory against the device memory chunks could
# use, and decide how well transfers and the optimizer hide behind compute: a larger micro-batch fetches every
# on-demand chunk fewer times per step and pays fewer launches; checkpointing makes a larger one fit for more
# compute. The optimizer runs once per step, inside the last micro-batch's backward. What compares is the
# predicted time of the whole step (`simulate` with `grad_accum` micro-batches).
# - Checkpointing options: none, every 2nd block, every block (CHECKPOINT_OPTIONS), in order of more
#   recomputation. Every block keeps the least (each block's input) for one extra forward of the blocks (about
#   +1/3 compute); every 2nd keeps about half as much for half that cost. A coarser k would sit between none
#   and every 2nd, a step no finer than halving the micro-batch already gives; each option costs a trace.
# - Micro-batches: the divisors of the rank's sequences. Per option, the profile of one micro-batch is the
#   profiled one scaled (`Profile.scaled`, see [Note: a profile at another batch size]); the largest b whose
#   activations fit beside the least model data the device can hold is searched first, then smaller ones
#   while the step gets faster (a smaller micro-batch leaves room for chunks to stay on the device).
# - An option with more recomputation is not traced when the best plan found already takes no longer than
#   the compute alone of the rank's sequences under the last option traced (`_Space.compute_floor_s`):
#   more recomputation only adds to that. Nor when the best plan is one micro-batch with everything
#   resident and the optimizer on the device: nothing is left to gain. Within an option, a micro-batch is
#   not searched when the compute alone of its step (more micro-batches: more launches) takes no less than
#   the best step found: a replay of the step instead of a placement search.
CHECKPOINT_OPTIONS = (0, 2, 1)


@dataclass(frozen=True)
class _Tried:
    """One searched point of the batch space, for the error when nothing fits."""

    checkpoint_every: int
    micro_batch_size: int
    plan: Plan
    pred: Prediction
    profile: Profile | None = None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _search_batch(
    profile: Profile,
    hardware: Hardware,
    *,
    world_size: int,
    compute_dtype,
    prefetch_depth: int,
    group_sizes: dict[str, int] | None,
    tokens_per_step: int,
    seq_len: int | None,
    profiled_sequences: int,
    checkpoint_profiles: Mapping[int, Profile | Callable[[], Profile]],
    nodes: int = 1,
    shard_over: str | None = None,
) -> tuple[Plan, Prediction]:
    for name, value in (("tokens_per_step", tokens_per_step), ("seq_len", seq_len),
                        ("profiled_sequences", profiled_sequences)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int for a batch search")
    for k in checkpoint_profiles:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"checkpoint_profiles key {k!r}: keys are checkpointing options k >= 1 (every k-th "
                             "block); the profile without checkpointing is the first argument")
    per_step = seq_len * world_size
    if tokens_per_step % per_step:
        lower = max(per_step, tokens_per_step // per_step * per_step)
        raise ValueError(
            f"tokens_per_step={tokens_per_step} is not a whole number of sequences of seq_len={seq_len} on each "
            f"of {world_size} rank(s); use a multiple of {per_step}, e.g. {lower} or {lower + per_step}"
        )
    sequences = tokens_per_step // per_step  # per rank and step
    space = _Space(hardware, world_size, compute_dtype, prefetch_depth, group_sizes, nodes=nodes, shard_over=shard_over)
    divisors = _divisors(sequences)
    options = [0, *sorted(checkpoint_profiles, reverse=True)]  # more recomputation later: every block last
    best: _Tried | None = None
    failed: list[_Tried] = []  # the least device memory of each point that did not fit, for the error
    floor_s = 0.0
    prof = profile
    for k in options:
        if best is not None and (best.pred.step_s <= floor_s or
                                 (best.micro_batch_size == sequences and _all_on_device(best.plan))):
            break
        prof = profile if k == 0 else checkpoint_profiles[k]
        prof = prof() if callable(prof) else prof
        per_sequence = prof.peak_activation_bytes / profiled_sequences
        room = space.device_budget - space.least_model_device_bytes(prof, k)
        best_k: _Tried | None = None
        for b in reversed([b for b in divisors if b * per_sequence <= room]):
            micro = prof.scaled(b / profiled_sequences)
            leader = min((t.pred.step_s for t in (best, best_k) if t is not None), default=None)
            if leader is not None and leader <= space.compute_floor_s(micro, sequences // b):
                break  # its compute alone takes as long as the best step, and a smaller b's longer still
            found, smallest, leanest = space.place(micro, micro_batch_size=b, grad_accum=sequences // b,
                                                   checkpoint_every=k)
            if found is None:
                # a smaller micro-batch leaves more of the device to model data, optimizer states included,
                # which takes them off the host too (L4): try it
                failed.append(_Tried(k, b, *(leanest or smallest), profile=micro))
                continue
            point = _Tried(k, b, *found)
            if best_k is not None and point.pred.step_s >= best_k.pred.step_s:
                break  # slower than the larger micro-batch: smaller ones only pay more launches and fetches
            best_k = point
            if _all_on_device(point.plan):
                break  # a smaller micro-batch has nothing to gain: more launches, the same placement at best
        if best_k is not None and (best is None or best_k.pred.step_s < best.pred.step_s):
            best = best_k
        floor_s = space.compute_floor_s(prof.scaled(sequences / profiled_sequences))
    if best is None:
        if not failed:  # no micro-batch's activations fit: the numbers of one sequence with the least of them
            k = options[-1]
            _, smallest, _ = space.place(prof.scaled(1 / profiled_sequences), micro_batch_size=1,
                                         grad_accum=sequences, checkpoint_every=k)
            failed.append(_Tried(k, 1, *smallest))
        raise _batch_infeasible(failed, space, world_size, seq_len, checkpointing_tried=len(options) > 1)
    return best.plan, best.pred


def _all_on_device(plan: Plan) -> bool:
    """Every chunk resident and every optimizer on the device: nothing fetched, nothing waited for."""
    return all(c.resident and c.optim_home == "device" for c in plan.chunks)


def _infeasible(
    smallest, device_budget: int, host_budget: int, world_size: int, *, step: str = "", activation_fix: str = "",
    placed: str = "with every chunk gathered on demand and everything possible on the host",
    space: _Space | None = None, profile: Profile | None = None, disk_options: list | None = None,
) -> PlanDoesNotFitError:
    """The error for no plan: the numbers of `smallest` (the plan that needs the least device memory, or as
    `placed` says), and the smallest changes that would fit. `step` says which step (a batch search: its
    micro-batch and checkpointing); `activation_fix` replaces the advice when activations are what overflows
    the device. With `space` and `profile` (or `disk_options`: (plan, profile, what) of each step tried), a
    scratch disk is named when moving the optimizer there would make the host fit."""
    plan, pred = smallest
    disk = None
    if space is not None and pred.host_bytes_peak > host_budget:
        disk = _disk_fix(space, disk_options or ([(plan, profile, "")] if profile is not None else []))
    lines = [
        f"no plan fits{step}: {placed}, a step needs "
        f"{_gib(pred.device_bytes_peak)} of device memory (of {_gib(device_budget)} usable) and "
        f"{_gib(pred.host_bytes_peak)} of host memory per rank (of {_gib(host_budget)} usable)."
    ]
    fixes = []
    if pred.host_bytes_peak > host_budget:
        ranks = -(-pred.host_bytes_peak * world_size // host_budget)
        fixes.append(f"more host memory: at least {_gib(pred.host_bytes_peak / HOST_MARGIN)} per rank")
        fixes.append(f"more GPUs: about {ranks} ranks shard the model data so that it fits")
        if disk is not None:
            fixes.append(disk)
    if pred.device_bytes_peak > device_budget:
        over = pred.device_bytes_peak - device_budget
        if pred.activation_bytes >= over:
            fixes.append(
                (activation_fix or "a smaller batch or activation checkpointing (with tokens_per_step, or "
                 "--tokens-per-step, the planner chooses the micro-batch and checkpointing itself)")
                + f": activations take {_gib(pred.activation_bytes)}, {_gib(over)} too much"
            )
        else:
            fixes.append(f"a device with at least {_gib(pred.device_bytes_peak / DEVICE_MARGIN)}")
    lines.append("Smallest changes that would fit: " + "; ".join(fixes) + ".")
    return PlanDoesNotFitError(" ".join(lines))


def _disk_fix(space: _Space, options: list) -> str | None:
    """A scratch disk as the fix, when moving every optimizer there (shards on the host, chunks on demand)
    makes one of `options` fit the host and the device: the one that needs the least disk."""
    best = None
    for plan, profile, what in options:
        on_disk = dataclasses.replace(plan, chunks=tuple(
            dataclasses.replace(c, resident=False, param_home="host", optim_home="disk") for c in plan.chunks),
            cache_blocks=max(plan.cache_blocks, 1))
        moved = space.memory_only(profile, on_disk)
        if moved.host_bytes_peak <= space.host_budget and moved.device_bytes_peak <= space.device_budget and (
                best is None or moved.model_disk_bytes < best[0].model_disk_bytes):
            best = (moved, what)
    if best is None:
        return None
    moved, what = best
    have = f" (this machine has {_gib(space.disk_budget)} usable)" if space.disk_budget else ""
    return (f"a scratch disk for the optimizer states (optim_home='disk'; elixir plan --disk-memory, elixir train "
            f"--disk): {_gib(moved.model_disk_bytes / DISK_MARGIN)} per rank{have}, which brings the host to "
            f"{_gib(moved.host_bytes_peak)}{what}")


def _batch_infeasible(
    failed: list[_Tried], space: _Space, world_size: int, seq_len: int, *, checkpointing_tried: bool
) -> PlanDoesNotFitError:
    # where the device fits, the least host memory any placement needed (host memory is what to add: the
    # device already holds all the optimizer states it can), else the least device memory
    on_device = [t for t in failed if t.pred.device_bytes_peak <= space.device_budget]
    point = (min(on_device, key=lambda t: (t.pred.host_bytes_peak, t.pred.device_bytes_peak, t.micro_batch_size))
             if on_device else min(failed, key=lambda t: (t.pred.device_bytes_peak, t.pred.host_bytes_peak)))
    placed = ("with every chunk gathered on demand and as many optimizer states on the device as fit beside it"
              if any(c.optim_home == "device" for c in point.plan.chunks) else
              "with every chunk gathered on demand and everything possible on the host")
    k, b = point.checkpoint_every, point.micro_batch_size
    how = {0: "no activation checkpointing", 1: "activation checkpointing of every block"}.get(
        k, f"activation checkpointing of every {k} blocks")
    step = f" even at micro-batch {b} of {seq_len}-token sequences with {how}"
    if b > 1:
        fix = f"a micro-batch under {b} sequences"
    elif checkpointing_tried:
        fix = f"shorter sequences than {seq_len} tokens"
    else:
        fix = "activation checkpointing (pass checkpoint_profiles: elixir.plan traces them)"
    options = [(t.plan, t.profile, f", at micro-batch {t.micro_batch_size} x {t.plan.grad_accum} accumulation step(s)")
               for t in failed if t.profile is not None]
    return _infeasible((point.plan, point.pred), space.device_budget, space.host_budget, world_size,
                       step=step, activation_fix=fix, placed=placed, space=space, disk_options=options)
