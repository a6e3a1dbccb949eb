"""The cost model: replay a profiled step under a plan and predict its time and peak memory.

Two streams, as on a GPU: a compute stream runs the profiled operators one after another, each with a
fixed launch / dispatch cost (FLOPs at the hardware's matmul rate for products of their size, fused attention
at its attention rate, operators without FLOPs at its memory-bound rate for the bytes they move); a
communication stream runs chunk
fetches (host->device copies and all-gathers) and gradient reductions. A fetch for a chunk that is not
cached stalls compute until it lands; prefetches for the next `prefetch_depth` chunks of the profiled order
start while compute goes on, when a cache block is free or holds a chunk needed later (Belady, as the
runtime does). A chunk's gradients are copied into its fp32 buffer as they arrive and the chunk is reduced
when the last one has, at the points the profile recorded (`Profile.grad_arrivals`). After backward, the
optimizer updates every chunk where its state lives and writes the master back into the parameter shard
where that is another buffer. On a CPU-only machine host<->device copies (fetches, gradients to the host)
run on the compute thread itself: they do not overlap.

[Note: memory the plan holds]
What the runtime's byte counters hold at the step's peak (the optimizer step, gradients still held).
device: resident chunks whole; on-demand chunks' shards that live on the device (a shard whose master
lives in the same tier is not stored: it is cast from the master at each fetch, see [Note: host bytes
per parameter] in runtime/wrap.py); the cache blocks (`Plan.cache_layout`); fp32 master (unless the fp32
parameter shard is its own master) and two AdamW states of chunks whose optimizer lives on the device;
the pool of fp32 gradient buffers, each as large as the largest chunk, as many as backward holds at once
(`gradients`: on one rank a chunk whose optimizer is on the device keeps its buffer as its gradient
until zero_grad); on several ranks the reduced gradient shards; on a GPU, two staging buffers for casts
across tiers (three where the optimizer's worker writes device shards) and, where host chunks log their
gradients in bf16 or fp16, the buffer those logs are cast through on their way down; the profiled
activations. host: stored parameter shards, masters and states of what
lives there, and per host-optimizer chunk either its fp32 gradient (held until after backward) or, when
its update runs inside backward, its rollback log in the compute dtype (see [Note: the step inside
backward] in elixir/optim/overlap.py), plus the staging buffers its gradient passes through (on a GPU
also those of gradients accumulated over several micro-batches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict, dataclass

from elixir.hardware import Hardware
from elixir.memory.chunk import pack_offsets, padded_numel
from elixir.memory.disk import ALIGN, DISK_BUFFERS, region_bytes
from elixir.memory.schedule import REDUCTIONS_IN_FLIGHT, EvictionSchedule, use_order
from elixir.optim.ondisk import READ_AHEAD
from elixir.optim.overlap import LOG_CAST_NUMEL, STAGING_BUFFERS
from elixir.plan import Plan, dtype_name
from elixir.profile import Profile

# AdamW keeps two fp32 states per element
_STATE_BYTES = 8
# every operator: a fixed launch / dispatch cost where the hardware record has no measured one
# (`Hardware.op_overhead_s`; eager PyTorch on the 2-core CPU of BENCHMARKS.md: ~4 us per aten operator of a
# chain of small ones, ~10 us per operator of a tiny transformer's step with the Python of its modules)
_OP_OVERHEAD_S = {"cpu": 4e-6, "gpu": 6e-6}
# every chunk collective of several CPU ranks (gloo): its signals' thread hand-offs and the ranks' skew, on the
# compute thread. On the 2-core CPU of BENCHMARKS.md a 10.8M GPT on 2 ranks ran at 0.888 of the
# no-communication floor with 32 chunks and at 0.974 with 6 (bench/bench_dist.py --chunk-mib 2.25 vs 8): ~77 ms
# per step for 52 more collectives, ~1.5 ms each. On GPUs NCCL's launches are asynchronous and cost
# microseconds: not modelled.
_COLLECTIVE_OVERHEAD_S = {"cpu": 1.5e-3, "gpu": 0.0}


@dataclass(frozen=True)
class Prediction:
    """Predicted time and memory of one training step under a plan."""

    step_s: float
    compute_s: float
    stall_s: float
    """Time compute waited for chunk fetches (communication that prefetch did not hide)."""
    comm_busy_s: float
    optim_s: float
    fetches: int
    device_bytes_peak: int
    host_bytes_peak: int
    model_device_bytes: int
    """Model data on the device (the runtime's device counter at its peak, activations excluded)."""
    model_host_bytes: int
    activation_bytes: int
    flops: int
    optim_in_backward_s: float = 0.0
    """Updates that ran inside backward (hidden behind it as far as the worker keeps up); `optim_s` is the
    part after backward."""
    model_disk_bytes: int = 0
    """Model data on the scratch disk: the regions of chunks with optim_home="disk"."""
    disk_busy_s: float = 0.0
    """Time the scratch disk spends reading and writing those regions in a step."""
    optim_wait_s: float = 0.0
    """Time backward waited for the optimizer worker to give a staging buffer back (it could not keep up)."""
    all_to_all_s: float = 0.0
    """Expert-parallel all-to-alls (`Profile.all_to_all`, balanced routing), at the collective rate of their
    group, on the critical path: the tokens are needed at once, so they overlap nothing."""

    def tflops(self) -> float:
        return self.flops / self.step_s / 1e12 if self.step_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tflops": self.tflops()}


@dataclass
class _Chunk:
    index: int
    names: tuple[str, ...]
    numel: int
    resident: bool
    param_home: str
    optim_home: str
    ranks: int
    """Ranks it is sharded over: the world, or a smaller group (expert parallel, `Plan.group_sizes`)."""
    aliased: bool = False
    """fp32 compute with shard and optimizer in one tier: the parameter shard is the master."""
    derived: bool = False
    """On demand with shard and optimizer in one tier, 16-bit compute: no shard stored, cast from the master."""
    speculated: bool = False
    """Its update runs inside backward (the plan's overlap; not for an aliased chunk)."""
    logged: bool = False
    """Speculated host- or disk-optimizer chunk whose gradient is not held: it keeps a rollback log instead
    (a host chunk in host memory, a disk chunk in its disk region)."""
    trainable: bool = True
    """Some of its parameters receive gradients; a frozen chunk has only its parameter shard."""
    replicas: int = 1
    """Nodes that each hold the chunk, sharded inside them (shard_over='node'): its reduced shard is then
    all-reduced over that many ranks, one per node; 1 for a chunk sharded over the world."""

    @property
    def shard(self) -> int:
        return self.numel // self.ranks


def trainable_names(profile: Profile) -> set[str] | None:
    """Parameters that receive gradients in the profiled step (the others are frozen: no master, optimizer
    state or gradient anywhere); None for a profile made by hand, which says nothing (all trainable)."""
    return set(profile.grad_arrivals) if profile.grad_arrivals else None


def layout(plan: Plan, profile: Profile) -> list[_Chunk]:
    itemsize = plan.dtype.itemsize
    trained = trainable_names(profile)
    out = []
    for i, c in enumerate(plan.chunks):
        numels = [profile.param_numels[n] for n in c.params]
        used = pack_offsets(numels, itemsize)[1]
        ranks = plan.chunk_ranks(c)
        trainable = trained is None or any(n in trained for n in c.params)
        same_home = c.param_home == c.optim_home
        aliased = trainable and itemsize == 4 and same_home
        speculated = trainable and plan.overlap and not aliased
        out.append(_Chunk(
            i, c.params, padded_numel(used, ranks), c.resident, c.param_home, c.optim_home, ranks,
            aliased=aliased, derived=trainable and not c.resident and same_home and not aliased,
            speculated=speculated, logged=speculated and c.optim_home in ("host", "disk") and plan.grad_accum == 1,
            trainable=trainable, replicas=plan.nodes if c.shard_over == "node" else 1,
        ))
    return out


def grad_arrivals(profile: Profile, chunks: list[_Chunk], chunk_of: dict[str, int]) -> list[tuple[int, int]]:
    """Every accumulation of a parameter's gradient as (operators before it, chunk), in time order.

    From the profile's `grad_arrivals`; a profile without them (made by hand) has each chunk's gradient
    arrive once, right after the chunk's last use in backward (or at the end of the step if unused there)."""
    events: list[tuple[int, int]] = []
    if profile.grad_arrivals:
        for name, when in profile.grad_arrivals.items():
            c = chunk_of.get(profile.tied_names.get(name, name))
            if c is not None:
                events.extend((i, c) for i in when)
        events.sort(key=lambda e: e[0])  # stable: ties keep the order the hooks fired in
        return events
    last = dict.fromkeys(range(len(chunks)), len(profile.ops))
    for i, op in enumerate(profile.ops):
        if op.phase == "backward":
            for name in op.params:
                if name in chunk_of:
                    last[chunk_of[name]] = i + 1
    return sorted(((i, c) for c, i in last.items()), key=lambda e: e[0])


@dataclass
class _Gradients:
    completions: list[tuple[int, int]]
    """(operators before it, chunk): when each chunk's gradient is complete and the runtime reduces it."""
    pool_buffers: int
    """fp32 buffers of the largest chunk that the runtime's pool ends up holding."""
    shard_bytes_peak: int
    """Largest device bytes of reduced gradient shards alive at once (several ranks only)."""


def gradients(plan: Plan, chunks: list[_Chunk], arrivals: list[tuple[int, int]]) -> _Gradients:
    """Replay the runtime's gradient buffers (see [Note: gradient buffers] in elixir/runtime/state.py).

    A chunk takes a pooled buffer (fp32, as large as the largest chunk) at its first gradient and reduces it
    when its last one has arrived. On one rank the reduction is the buffer itself: a chunk whose optimizer
    lives on the device adopts it as its gradient until `zero_grad` (no copy), one on the host copies it out
    and gives it back. On several ranks every buffer is reduce-scattered into a new shard and comes back once
    its reduction is finished, with up to `REDUCTIONS_IN_FLIGHT` left in flight (the rest finish as backward
    ends); the shard stays as the gradient (optimizer on the device) or is copied to the host and freed when
    that reduction finishes. With several micro-batches per step, a later one's buffers and shards of device
    chunks are added into the gradients the first one left and given back (`GradReducer._into_master_grad`):
    its buffers come beside the held ones, so a second micro-batch is replayed after the first. The pool never
    shrinks: its size is the most buffers held at once."""
    need: dict[int, int] = {}
    for _, c in arrivals:
        need[c] = need.get(c, 0) + 1
    held = pool = shard_bytes = shard_peak = 0
    in_flight: list[tuple[int, bool]] = []  # (chunk, reduced in a later micro-batch)
    completions = []

    def finish(c: int, later: bool) -> None:
        nonlocal held, shard_bytes
        done = chunks[c]
        held -= 1
        if done.optim_home != "device" or later:  # copied to the host, or added into the held gradient
            shard_bytes -= done.numel // done.ranks * 4

    for later in (False, True)[: min(plan.grad_accum, 2)]:
        seen: dict[int, int] = {}
        for i, c in arrivals:
            if not seen.get(c):
                held += 1
                pool = max(pool, held)
            seen[c] = seen.get(c, 0) + 1
            if seen[c] < need[c]:
                continue
            seen[c] = 0
            if not later:
                completions.append((i, c))
            ch = chunks[c]
            if ch.ranks == 1 and ch.replicas == 1:  # reduced in place (one rank, or an expert group of one)
                if ch.optim_home != "device" or later:
                    held -= 1
                continue
            shard_bytes += ch.numel // ch.ranks * 4
            shard_peak = max(shard_peak, shard_bytes)
            in_flight.append((c, later))
            if len(in_flight) > REDUCTIONS_IN_FLIGHT:
                finish(*in_flight.pop(0))
        while in_flight:  # backward's end finishes every reduction
            finish(*in_flight.pop(0))
    return _Gradients(completions, pool, shard_peak)


def disk_region(plan: Plan, c: _Chunk) -> int:
    """Bytes of a disk chunk's region of the scratch file (elixir/memory/disk.py): master, AdamW's two states,
    and its rollback log when it has one."""
    return region_bytes(c.shard, _STATE_BYTES // 4, plan.dtype.itemsize if c.logged else 0)


def memory(plan: Plan, chunks: list[_Chunk], grads: _Gradients | None = None, *,
           gpu: bool = False) -> tuple[int, int, int]:
    """Model-data bytes (device, host, disk) at the step's peak; see [Note: memory the plan holds]. `gpu`:
    the device is a GPU (staging for host gradients of later micro-batches, device staging for casts)."""
    itemsize = plan.dtype.itemsize
    device = host = disk = 0
    if grads is None:  # every chunk's gradient arriving once, in reverse order of the chunks
        grads = gradients(plan, chunks, [(len(chunks) - c.index, c.index) for c in reversed(chunks)])
    blocks, block_numel = plan.cache_layout()
    device += blocks * block_numel * itemsize
    biggest = 0
    for c in chunks:
        shard = c.shard
        if c.resident:
            device += c.numel * itemsize
        elif not c.derived:
            if c.param_home == "device":
                device += shard * itemsize
            else:
                host += shard * itemsize
        biggest = max(biggest, c.numel)  # the pooled gradient buffers are as large as the largest chunk
        if not c.trainable:  # frozen: its (stored) parameter shard only
            continue
        master = 0 if c.aliased else 4
        if c.optim_home == "device":
            device += shard * (master + _STATE_BYTES)  # its gradient is a pooled buffer or a reduced shard
        elif c.optim_home == "host":
            host += shard * (master + _STATE_BYTES + (itemsize if c.logged else 4))
        else:  # disk: the region on disk; on the host, a held gradient unless a log replaces it
            disk += disk_region(plan, c)
            host += 0 if c.logged else shard * 4
    device += grads.pool_buffers * biggest * 4 + grads.shard_bytes_peak
    staged = [c.shard for c in chunks
              if c.logged or (gpu and plan.grad_accum > 1 and c.trainable and c.optim_home != "device")]
    if staged:
        host += STAGING_BUFFERS * max(staged) * 4
    on_disk = [disk_region(plan, c) for c in chunks if c.trainable and c.optim_home == "disk"]
    if on_disk:
        host += DISK_BUFFERS * (max(on_disk) + ALIGN)
    crossing = [c.shard for c in chunks if c.trainable and itemsize != 4 and (
        c.param_home != c.optim_home or (c.derived and c.optim_home == "host"))]
    logged_host = [c.shard for c in chunks if c.logged and c.optim_home == "host"]
    if gpu and logged_host and itemsize != 4:  # the device buffer a log is cast through (`LOG_CAST_NUMEL`)
        device += min(LOG_CAST_NUMEL, max(logged_host)) * itemsize
    if gpu and crossing:
        device += 2 * max(crossing) * 4
        if any(c.trainable and itemsize != 4 and c.param_home != c.optim_home and c.optim_home != "device"
               for c in chunks):  # host and disk chunks write their shards from the optimizer's worker thread
            device += max(crossing) * 4
    return device, host, disk


class _DiskTimeline:
    """The scratch disk's reads and writes of disk chunks' regions, in the order of their updates (see
    elixir/optim/ondisk.py): the first READ_AHEAD regions are read from `start`, each update waits for its
    region, and after it the disk writes that region, then reads the next one ahead."""

    def __init__(self, plan: Plan, chunks: list[_Chunk], hardware: Hardware, order: list[int]) -> None:
        self.plan, self.hardware = plan, hardware
        self.order = [c for c in order if chunks[c].optim_home == "disk"]
        self.chunks = chunks
        self.read_done: dict[int, float] = {}
        self.t_disk = 0.0
        self.busy = 0.0
        self.started = False
        self.next = 0  # index in `order` of the next region to read
        self.after_busy = 0.0  # the disk's busy time in the optimizer step after backward (`_optimizer_after`)

    def _read_next(self) -> None:
        if self.next < len(self.order):
            c = self.chunks[self.order[self.next]]
            took = disk_region(self.plan, c) / self.hardware.disk_read_bytes_per_s
            self.t_disk += took
            self.busy += took
            self.read_done[c.index] = self.t_disk
            self.next += 1

    def start(self, at: float) -> None:
        if self.started or not self.order:
            return
        self.started = True
        self.t_disk = max(self.t_disk, at)
        for _ in range(READ_AHEAD):
            self._read_next()

    def update(self, c: _Chunk, ready: float, seconds: float) -> float:
        """When `c`'s update, ready to run at `ready`, ends; its write and the next read follow on the disk."""
        self.start(ready)
        while c.index not in self.read_done and self.next < len(self.order):
            self._read_next()  # not read ahead yet: read up to it
        if c.index not in self.read_done:
            took = disk_region(self.plan, c) / self.hardware.disk_read_bytes_per_s
            self.t_disk = max(self.t_disk, ready) + took
            self.busy += took
            self.read_done[c.index] = self.t_disk
        done = max(ready, self.read_done.pop(c.index)) + seconds
        took = disk_region(self.plan, c) / self.hardware.disk_write_bytes_per_s
        self.t_disk = max(self.t_disk, done) + took
        self.busy += took
        self._read_next()
        return done


class Network:
    """What a chunk's collectives cost on a two-level network: links inside a node, and the node's links to
    the other nodes, which its ranks share (`Hardware.bus_rate`). A ring collective over g ranks moves
    (g - 1) / g of its bytes per rank in g - 1 steps, each step paying the latency of the slowest link it
    crosses. See [Note: hierarchical sharding] in elixir/parallel/nodes.py for the two layouts:
    - world sharding over several nodes: every all-gather and reduce-scatter crosses nodes;
    - node sharding: gathers and reduce-scatters inside the node, then an all-reduce of the fp32 shard over
      the nodes (2 (N - 1) / N of the shard per rank, in 2 (N - 1) steps)."""

    def __init__(self, hardware: Hardware, *, world_size: int, nodes: int = 1) -> None:
        self.hardware = hardware
        self.world_size = world_size
        self.nodes = nodes
        self.ranks_per_node = world_size // nodes

    def _ring_s(self, ranks: int, nbytes: float, *, across: bool, steps: int) -> float:
        rate = self.hardware.bus_rate(ranks, across_nodes=across, ranks_per_node=self.ranks_per_node,
                                      world_size=self.world_size)
        return nbytes / rate + steps * self.hardware.step_latency_s(across)

    def crosses_nodes(self, c: _Chunk) -> bool:
        """Whether the chunk's all-gathers and reduce-scatters cross nodes (sharded over the world)."""
        return self.nodes > 1 and c.replicas == 1 and c.ranks > 1

    def gather_s(self, c: _Chunk, nbytes: int) -> float:
        """An all-gather (or reduce-scatter) of the chunk's `nbytes` over its group."""
        if c.ranks == 1:
            return 0.0
        return self._ring_s(c.ranks, (c.ranks - 1) / c.ranks * nbytes, across=self.crosses_nodes(c),
                            steps=c.ranks - 1)

    def all_reduce_replicas_s(self, c: _Chunk) -> float:
        """The all-reduce of a node chunk's fp32 gradient shard over its replicas, one rank per node."""
        r = c.replicas
        if r == 1:
            return 0.0
        return self._ring_s(r, 2 * (r - 1) / r * c.shard * 4, across=True, steps=2 * (r - 1))

    def reduce_s(self, c: _Chunk) -> float:
        """Seconds of a chunk's gradient reduction on the communication stream."""
        return self.gather_s(c, c.numel * 4) + self.all_reduce_replicas_s(c)

    def reduce_collectives(self, c: _Chunk) -> int:
        return (c.ranks > 1) + (c.replicas > 1)


def simulate(profile: Profile, plan: Plan, hardware: Hardware) -> Prediction:
    """Predict one step of `profile` under `plan` on `hardware` (one rank of `plan.world_size`): `profile`
    is one micro-batch, and a step is `plan.grad_accum` of them, the optimizer after (or inside) the last."""
    last = _micro_batch(profile, plan, hardware, optimizer=True, held=plan.grad_accum > 1)
    if plan.grad_accum == 1:
        return last
    # the first micro-batch's gradients become the held ones; every later one adds into them (see [Note: adding
    # into the held gradients])
    first = _micro_batch(profile, plan, hardware, optimizer=False, held=False)
    middle = [_micro_batch(profile, plan, hardware, optimizer=False, held=True)] * (plan.grad_accum - 2)
    earlier = [first, *middle]

    def total(field: str):
        return getattr(last, field) + sum(getattr(p, field) for p in earlier)

    return dataclasses.replace(
        last, step_s=total("step_s"), compute_s=total("compute_s"), stall_s=total("stall_s"),
        comm_busy_s=total("comm_busy_s"), fetches=total("fetches"), flops=plan.grad_accum * last.flops,
        all_to_all_s=plan.grad_accum * last.all_to_all_s,
    )


@dataclass
class _Clocks:
    """Where each thread and stream of the step has got to (seconds from the step's start)."""

    compute: float = 0.0
    """The compute thread (stream): operators, and on a CPU the copies it makes itself."""
    comm: float = 0.0
    """The communication stream: fetches' copies and all-gathers, reductions."""
    comm_busy: float = 0.0
    stall: float = 0.0
    """Compute's waits for fetches."""
    worker: float = 0.0
    """The optimizer's worker thread (updates inside backward: host chunks; every chunk on a CPU)."""
    side: float = 0.0
    """The device optimizer's side stream on a GPU."""
    written: float = 0.0
    """The worker's stream on a GPU: updated masters written up into their device shards."""
    optim_wait: float = 0.0
    """Backward's waits for a staging buffer of the worker."""
    shared: float = 0.0
    """The worker's updates charged to the compute thread: a CPU device without a spare core."""


class _FetchReplay:
    """The block cache of on-demand chunks over one micro-batch, driven by the runtime's own eviction schedule
    and prefetch policy (see [Note: one policy for the runtime and the cost model] in
    elixir/memory/schedule.py): a `CacheView` whose fetches are charged on the clocks, as `fetch_cost` says
    (seconds on the issuing thread, then on the communication stream). The chunks an operator uses are
    pinned (not evictable) while it fetches them."""

    def __init__(self, order: list[int], blocks: int, prefetch_depth: int,
                 fetch_cost: Callable[[int], tuple[float, float]], clocks: _Clocks) -> None:
        self.schedule = EvictionSchedule()
        self.schedule.set_order(order)
        self.schedule.start_forward()
        self.blocks = blocks
        self.prefetch_depth = prefetch_depth
        self.fetch_cost = fetch_cost
        self.clocks = clocks
        self.held: set[int] = set()
        self.ready: dict[int, float] = {}  # chunk -> when its fetch lands
        self.pinned: set[int] = set()
        self.fetches = 0
        self._uses = 0
        self._last_use: dict[int, int] = {}

    # CacheView
    def is_cached(self, chunk: int) -> bool:
        return chunk in self.held

    def has_free_block(self) -> bool:
        return len(self.held) < self.blocks

    def evictable(self) -> list[int]:
        return [c for c in self.held if c not in self.pinned]

    def last_use(self, chunk: int) -> int:
        return self._last_use.get(chunk, 0)

    def evict(self, chunk: int) -> None:
        self.held.discard(chunk)

    def start_prefetch(self, chunk: int) -> None:
        self._start(chunk)

    def _start(self, chunk: int) -> None:
        clocks = self.clocks
        on_compute, on_comm = self.fetch_cost(chunk)
        clocks.compute += on_compute
        start = max(clocks.comm, clocks.compute)  # the issuing thread's part first (on a CPU: the copy)
        clocks.comm = start + on_comm
        clocks.comm_busy += on_comm
        self.ready[chunk] = clocks.comm
        self.held.add(chunk)
        self.fetches += 1

    def use(self, chunks: list[int]) -> float:
        """An operator uses `chunks` (in order; may be empty): fetch those not cached, prefetch ahead, and
        return when the operator can start (its chunks have landed)."""
        clocks = self.clocks
        self.pinned = set()
        for c in chunks:  # as Runtime.acquire does for each
            self._uses += 1
            self._last_use[c] = self._uses
            moved = self.schedule.use(c)
            self.pinned.add(c)
            if c not in self.held:
                if not self.has_free_block():
                    candidates = self.evictable()
                    if not candidates:
                        continue  # every block in use: the runtime grows its cache (not charged)
                    self.evict(self.schedule.victim(candidates, self.last_use))
                self._start(c)
            if moved and self.prefetch_depth:  # the use moved the schedule on: look ahead from there
                self.schedule.prefetch(self, self.prefetch_depth)
        start = max([clocks.compute] + [self.ready.get(c, 0.0) for c in self.pinned])
        clocks.stall += start - clocks.compute
        return start


# [Note: the worker without a core of its own]
# On a CPU device the model and the optimizer's worker thread (the step inside backward, see [Note: the step
# inside backward] in elixir/optim/overlap.py) compute on the same cores. Where the ranks' compute threads
# leave a core idle (`Hardware.spare_cores` >= 1: one thread per process on two cores) the worker runs there
# and its updates hide behind backward. Where they do not (torch's default of one thread per core), the
# worker's thread takes its time from the compute threads: on the 2-core CPU of BENCHMARKS.md the step with
# the update inside backward was slower than the same plan with the update after it (0.216-0.234 s against
# 0.201-0.203 s, two compute threads; 1.12x in bench/bench_overlap.py's runs where another job held a core).
# The replay charges such an update to the compute clock when its gradient is ready, as if the compute thread
# made it there itself: a lower bound, since the scheduler's sharing of the cores also stalls the compute
# threads' parallel regions. The search does not choose the overlap there (`overlap_pays`).
# [Note: the gradient check before an update]
# Before a chunk is updated its fp32 gradient is checked for an inf or a NaN: one sum over it (fp32, bf16),
# or, under fp16's loss scaling, a division by the scale, `isfinite` and `any` (about 14 bytes per element
# read and written). On the 2-core CPU of BENCHMARKS.md the sums of the reference GPT's 50M gradients took
# 5.2 ms beside 22.3 ms of fused AdamW: ~1.5% of its step, and the optimizer's prediction was 1.4x short of
# its measured time without it. On the device it is priced as the memory-bound operator it is. A host
# chunk's gradient on a GPU machine is checked on the device, on its way down to the host, and its rollback log
# is cast there and crosses beside it (`Speculation.copied_down` in elixir/optim/overlap.py): on the H200 of
# BENCHMARKS.md the worker's cast into the log and its sum took 40% of each host update (4.3 and 2.3 ms of
# 16.8 per 32M-element chunk) where the copy engine had time to spare. Under fp16's loss scale, and for a
# chunk updated after backward or from disk, the host's cores still check it, and copy a disk chunk's log, at
# the host's memory-bound rate (`Hardware.host_bytes_per_s`, timed on a cast and a sum beyond its caches).
# The check's handful of small operators (a few tens of microseconds per chunk on the CPU) is not charged; the
# step call's own cost per chunk is (`Hardware.optim_step_overhead_s`). A run that clips (a plan does not say
# whether it does) pays about the same in bf16 and fp32: for a chunk updated after backward the clip's norm is
# its one read of the gradient and takes the check's place (the norm says whether it is finite), and a clip that
# does not act writes nothing (`ElixirOptimizer.clip_grad_norm_`). Not charged: the norms of fp16, beside its
# check, and its multiply by one on a GPU (8 bytes per element, rather than wait for the norms); the norm an update
# inside backward takes beside its check (on a host chunk's copy down at the device's rate, on the worker 4 more
# bytes per element at the host's memory-bound rate); and a clip that acts, which multiplies every gradient (8
# bytes per element) and redoes the updates made inside backward.
_CHECKED_BYTES_PER_ELEMENT = {False: 4, True: 14}  # by "fp16 with loss scaling"


class OperatorTimes:
    """Seconds one profiled operator takes on `hardware` in `dtype`, the cost of running an operator at all
    (`Hardware.op_overhead_s`) included, interception and `Hardware.compute_scale` not: what the rates predict.
    Remembers the sizes it has seen (a step repeats a few over and over)."""

    def __init__(self, hardware: Hardware, dtype) -> None:
        self.hardware, self.dtype = hardware, dtype
        hardware.matmul_rate(dtype)  # a ValueError that names the dtype, where the hardware has no rate for it
        self.attention = hardware.attention_rate(dtype)
        self.grouped = hardware.grouped_mm_rate(dtype)
        self.overhead = hardware.op_overhead_s or _OP_OVERHEAD_S["cpu" if hardware.device_type == "cpu" else "gpu"]
        self.memory_bound_s: dict[int, float] = {}  # by bytes moved
        self.matmul_s: dict[int, float] = {}  # by FLOPs of one product (`Hardware.matmul_by_size`)

    def __call__(self, op) -> float:
        return self.kernel(op) + self.overhead

    def kernel(self, op) -> float:
        if op.flops:
            if "attention" in op.name or "grouped_mm" in op.name:
                return op.flops / (self.attention if "attention" in op.name else self.grouped)
            seconds = self.matmul_s.get(op.flops)
            if seconds is None:
                seconds = self.matmul_s[op.flops] = op.flops / self.hardware.matmul_rate(self.dtype, op.flops)
            return seconds
        # memory-bound: see [Note: what a memory-bound operator costs] in elixir/profile/trace.py
        moved = op.out_bytes * 2 if op.moved_bytes is None else op.moved_bytes
        seconds = self.memory_bound_s.get(moved)
        if seconds is None:
            seconds = self.memory_bound_s[moved] = moved / self.hardware.eager_rate(moved) if moved else 0.0
        return seconds


def overlap_pays(hardware: Hardware) -> bool:
    """Whether updating chunks inside backward can hide anything on `hardware`: on a GPU, or on a CPU device
    with a core that no compute thread uses (see [Note: the worker without a core of its own])."""
    return hardware.device_type != "cpu" or hardware.spare_cores >= 1


# [Note: adding into the held gradients]
# With several micro-batches per step the first one's gradients are held (a device chunk adopts its reduced
# buffer, a host chunk's is copied down) and every later one's are added into them: 12 bytes per element
# (both read, the sum written, fp32). Where they are added:
# - a device chunk's on the device, and on a CPU device every chunk's on the compute thread (no copy);
# - on a GPU, a host chunk's on the optimizer's worker after its copy down when updates run inside backward
#   ([Note: accumulating on the worker] in elixir/optim/overlap.py), through the staging buffers its
#   updates use, at the host's memory-bound rate; in the last micro-batch its update follows its add;
# - otherwise (no worker, or a disk chunk) on the main thread: the copy on the compute stream, the device
#   synchronized, then the host's add, while the device waits.
ACCUMULATE_BYTES_PER_ELEMENT = 12


def _micro_batch(profile: Profile, plan: Plan, hardware: Hardware, *, optimizer: bool,
                 held: bool = False) -> Prediction:
    """One micro-batch's forward and backward, with (`optimizer`) or without the optimizer step; `held`: an
    earlier micro-batch of the step left gradients that this one's are added into."""
    chunks = layout(plan, profile)
    chunk_of = {name: c.index for c in chunks for name in c.names}
    for other, first in profile.tied_names.items():
        if first in chunk_of:
            chunk_of[other] = chunk_of[first]
    ondemand_of = {name: c for name, c in chunk_of.items() if not chunks[c].resident}
    itemsize = plan.dtype.itemsize
    cpu = hardware.device_type == "cpu"
    worker_core = overlap_pays(hardware)
    # the model's operators, as its block was timed on the device (see `Hardware.compute_scale`)
    scale = hardware.compute_scale
    intercepted = hardware.interception_op_s if ondemand_of else 0.0  # every parameter use (elixir/runtime/hooks.py)
    per_collective = _COLLECTIVE_OVERHEAD_S["cpu" if cpu else "gpu"]
    op_seconds = OperatorTimes(hardware, plan.dtype)  # a ValueError naming the dtype where it has no matmul rate
    network = Network(hardware, world_size=plan.world_size, nodes=plan.nodes)
    copy_rate = hardware.device_copy_bytes_per_s

    def fetch_cost(index: int) -> tuple[float, float]:
        """(seconds on the compute thread, seconds on the communication stream)."""
        c = chunks[index]
        shard_bytes = c.shard * (4 if c.derived else itemsize)  # a derived shard is read from its fp32 master
        move = shard_bytes / (hardware.h2d_bytes_per_s if c.param_home == "host" else copy_rate)
        gather = network.gather_s(c, c.numel * itemsize)
        if cpu:
            return move + (per_collective if c.ranks > 1 else 0.0) + hardware.fetch_overhead_s, gather
        return hardware.fetch_overhead_s, move + gather

    loss_scaled = dtype_name(plan.dtype) == "float16"  # the optimizer's LossScaler (elixir/optim/sharded.py)

    def update_s(c: _Chunk) -> float:
        rate = hardware.device_optim_elems_per_s if c.optim_home == "device" else hardware.host_optim_elems_per_s
        seconds = c.shard / rate
        # the check for non-finite gradients first (`ShardedOptimizer._unscale`), where the update runs: on the
        # device, a memory-bound operator over the gradient; on the host of a GPU machine, at the host's
        # memory-bound rate (see [Note: the gradient check before an update])
        checked = c.shard * _CHECKED_BYTES_PER_ELEMENT[loss_scaled]
        if c.optim_home == "device" or cpu:
            seconds += checked / hardware.eager_rate(checked)
        elif not _checked_on_copy(c, cpu) or loss_scaled:
            seconds += checked / hardware.host_stream_rate()
        # a logged chunk's gradient is copied from its staging buffer into its rollback log first (fp32 read,
        # compute dtype written; `Speculation._update_in_memory`), unless it went into the log directly
        # (`Speculation.logs_directly`: an fp32 log of a host chunk on the CPU, no loss scale) or the copy down
        # from the device wrote it (`Speculation.copied_down`: a host chunk on a GPU)
        if c.logged and not (cpu and itemsize == 4 and c.optim_home == "host" and not loss_scaled):
            logged = c.shard * (4 + itemsize)
            if cpu:
                seconds += logged / hardware.eager_rate(logged)
            elif not _checked_on_copy(c, cpu):  # the host's cores cast the fp32 gradient into the log
                seconds += logged / hardware.host_stream_rate()
        seconds += hardware.optim_step_overhead_s  # the step call's own work, once per chunk
        if c.optim_home == "disk" and c.param_home == "device" and not cpu:  # it writes its shard on the device:
            seconds += c.shard * 4 / hardware.h2d_bytes_per_s  # the fp32 master crosses, the cast runs there
        return seconds

    grads = gradients(plan, chunks, grad_arrivals(profile, chunks, chunk_of))
    completed_after: dict[int, list[int]] = {}  # operator index -> chunks whose gradient is complete after it
    for k, c in grads.completions:
        completed_after.setdefault(max(k - 1, 0), []).append(c)

    clocks = _Clocks()
    cache = _FetchReplay(use_order((n for op in profile.ops for n in op.params), ondemand_of), plan.cache_blocks,
                         plan.prefetch_depth, fetch_cost, clocks)
    # [Note: the step inside backward] (elixir/optim/overlap.py): speculated chunks are updated on a
    # worker (host chunks; on the CPU every chunk) or a side stream (device chunks on a GPU) as soon as
    # their gradient is reduced; a host chunk's gradient waits for one of the staging buffers first
    staged_done: list[float] = []  # when each staged host update finished (its buffer came back)
    disk = _DiskTimeline(plan, chunks, hardware, [c for _, c in grads.completions])
    worker_writes: list[tuple[float, float]] = []  # (its update's end, its write's seconds)

    def reduce(ch: _Chunk) -> None:
        """The chunk's gradients are complete: reduce it, and update it inside backward if it is speculated."""
        # every gradient was copied into the chunk's fp32 buffer as it arrived (see [Note: gradient buffers])
        clocks.compute += ch.numel * 4 / copy_rate + per_collective * network.reduce_collectives(ch)
        red = network.reduce_s(ch)
        to_host = ch.shard * 4 / hardware.d2h_bytes_per_s if ch.optim_home != "device" else 0.0
        if _checked_on_copy(ch, cpu) and optimizer:  # the log crosses too, cast (and checked) on the device first
            to_host += ch.shard * itemsize / hardware.d2h_bytes_per_s
            device_work = ch.shard * (4 + itemsize + (0 if loss_scaled else 4))
            to_host += device_work / hardware.eager_rate(device_work)
        # see [Note: adding into the held gradients]
        added = ch.shard * ACCUMULATE_BYTES_PER_ELEMENT if held else 0
        added_on_worker = added and not cpu and plan.overlap and ch.optim_home == "host"
        added_on_host = added and not cpu and not added_on_worker and ch.optim_home != "device"
        if added and not added_on_worker and not added_on_host:  # where the gradient is: no copy
            to_host = 0.0
            clocks.compute += added / hardware.eager_rate(added)
        if (ch.logged or added_on_worker) and len(staged_done) >= STAGING_BUFFERS:  # a staging buffer comes back
            clocks.optim_wait += max(0.0, staged_done[-STAGING_BUFFERS] - clocks.compute)
            clocks.compute = max(clocks.compute, staged_done[-STAGING_BUFFERS])
        if cpu:  # a synchronous copy on the compute thread
            clocks.compute += to_host
        elif added_on_host:  # copied on the compute stream, the device synchronized, added by the main thread
            clocks.compute = max(clocks.compute, clocks.comm) + to_host + added / hardware.host_stream_rate()
        else:
            red += to_host
        clocks.comm = max(clocks.comm, clocks.compute) + red
        clocks.comm_busy += red
        if added_on_worker:  # after its copy down, before its update
            clocks.worker = max(clocks.worker, clocks.comm) + added / hardware.host_stream_rate()
            staged_done.append(clocks.worker)
        if ch.speculated and optimizer:
            if ch.optim_home == "disk":
                clocks.worker = disk.update(ch, max(clocks.worker, clocks.comm, clocks.compute), update_s(ch))
            elif cpu and not worker_core:  # see [Note: the worker without a core of its own]
                clocks.compute += update_s(ch)
                clocks.shared += update_s(ch)
                clocks.worker = max(clocks.worker, clocks.comm, clocks.compute)
            elif cpu or ch.optim_home == "host":
                clocks.worker = max(clocks.worker, clocks.comm, clocks.compute) + update_s(ch)
                if _writes_from_worker(ch, cpu):  # see [Note: the worker's writes wait for the queued compute]
                    worker_writes.append((clocks.worker, ch.shard * 4 / hardware.h2d_bytes_per_s))
            else:
                clocks.side = max(clocks.side, clocks.comm) + update_s(ch)
            if ch.logged:
                staged_done.append(clocks.worker)

    for i, op in enumerate(profile.ops):
        start = cache.use([ondemand_of[n] for n in op.params if n in ondemand_of])
        if op.phase == "backward" and optimizer and plan.overlap:
            disk.start(start)  # the update inside backward reads disk regions ahead from here
        clocks.compute = start + op_seconds(op) * scale + intercepted
        for c in completed_after.get(i, ()):
            reduce(chunks[c])
    for updated, write_s in worker_writes:
        clocks.written = max(clocks.written, clocks.compute, updated) + write_s
    end_backward = max(clocks.compute, clocks.comm, clocks.worker, clocks.side, clocks.written)

    optim = _optimizer_after(plan, chunks, hardware, network, update_s, end_backward, disk) if optimizer else 0.0
    model_device, model_host, model_disk = memory(plan, chunks, grads, gpu=not cpu)
    activations = profile.peak_activation_bytes
    all_to_all = sum(nbytes / hardware.collective_rate(ranks) for ranks, nbytes in profile.all_to_all)
    return Prediction(
        step_s=end_backward + optim + all_to_all,
        compute_s=clocks.compute - clocks.stall - clocks.optim_wait - clocks.shared,
        stall_s=clocks.stall,
        comm_busy_s=clocks.comm_busy,
        optim_s=optim,
        optim_in_backward_s=sum(update_s(c) for c in chunks if c.speculated) if optimizer else 0.0,
        optim_wait_s=clocks.optim_wait,
        fetches=cache.fetches,
        device_bytes_peak=model_device + activations,
        host_bytes_peak=model_host,
        model_disk_bytes=model_disk,
        disk_busy_s=disk.busy + disk.after_busy if optimizer else 0.0,
        model_device_bytes=model_device,
        model_host_bytes=model_host,
        activation_bytes=activations,
        flops=profile.total_flops,
        all_to_all_s=all_to_all,
    )


def _checked_on_copy(c: _Chunk, cpu: bool) -> bool:
    """Whether the copy of the chunk's gradient down to the host also writes its rollback log, cast on the
    device, beside the device's finite check (`Speculation.copied_down` in elixir/optim/overlap.py): a logged
    host chunk on a GPU."""
    return not cpu and c.logged and c.optim_home == "host"


# [Note: the worker's writes wait for the queued compute]
# On a GPU the worker writes an updated master up into its device shard on a stream of its own, ordered after
# everything the compute stream has queued when it asks (`ElixirOptimizer.write_shard`: the stream waits for
# the current stream): the fp32 master crosses and the device casts ([Note: casts beside the copy] in
# elixir/accel.py). Where the host queues backward's kernels ahead of the device, that is after backward's
# kernels; charged so, the writes one after another, each also after its update, and the step ends when the
# last has landed. Where the host is not ahead the writes land earlier, beside backward: this is the later
# bound, and the worker's updates themselves, not their writes, decide the step's end in the plans measured
# (BENCHMARKS.md, "On one GPU").
def _writes_from_worker(c: _Chunk, cpu: bool) -> bool:
    """Whether the chunk's update inside backward also writes its device shard, on the GPU from the optimizer's
    worker on a stream of its own (`Speculation._write_shard` in elixir/optim/overlap.py), not after backward."""
    return not cpu and c.speculated and c.optim_home == "host" and c.param_home == "device"


def _optimizer_after(plan: Plan, chunks: list[_Chunk], hardware: Hardware, network: Network,
                     update_s: Callable[[_Chunk], float], end_backward: float, disk: _DiskTimeline) -> float:
    """Seconds of the optimizer step after backward, on the main thread: the updates not made inside backward
    (disk chunks read ahead and written behind one by one), each master cast into its shard where that lives
    in another tier or dtype, resident chunks gathered again; at least until the disk has written what the
    updates inside backward left behind. Records the disk's busy time after backward in `disk.after_busy`."""
    itemsize = plan.dtype.itemsize
    cpu = hardware.device_type == "cpu"
    per_collective = _COLLECTIVE_OVERHEAD_S["cpu" if cpu else "gpu"]
    optim = 0.0
    later_on_disk = [c for c in chunks if c.trainable and c.optim_home == "disk" and not c.speculated]
    if later_on_disk:  # read ahead and written behind as the main thread updates them one by one
        after = _DiskTimeline(plan, chunks, hardware, [c.index for c in later_on_disk])
        after.start(end_backward)
        done = end_backward
        for c in later_on_disk:
            done = after.update(c, done, update_s(c))
        optim += max(done, after.t_disk) - end_backward
        disk.after_busy = after.busy
    for c in chunks:
        shard = c.shard
        if not c.trainable:
            continue  # nothing updated, nothing written back or gathered again
        if c.optim_home == "disk":
            continue  # updated above or inside backward, where it also wrote its shard
        if not c.speculated:
            optim += update_s(c)
        if c.optim_home != c.param_home:
            # the updated master is cast into the shard in the other tier (unless the worker wrote it inside
            # backward): up to the device the fp32 master crosses and the device casts; down to the host the
            # device casts and the cast crosses ([Note: casts beside the copy] in elixir/accel.py)
            if not _writes_from_worker(c, cpu):
                optim += (shard * 4 / hardware.h2d_bytes_per_s if c.optim_home == "host"
                          else shard * itemsize / hardware.d2h_bytes_per_s)
        elif itemsize != 4 and not c.derived:
            optim += shard * itemsize / hardware.device_copy_bytes_per_s
        if c.resident and c.ranks > 1:
            optim += network.gather_s(c, c.numel * itemsize) + per_collective
    return max(optim, disk.t_disk - end_backward)  # the writes behind the last updates inside backward
