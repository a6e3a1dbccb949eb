"""The runtime state of a wrapped model: its chunks, the block cache, fetching; gradients in grads.py.

[Note: pins]
A chunk that something is using right now is pinned and is never evicted:
- forward: a module's own on-demand chunks, from its pre-forward hook to its post-forward hook;
- a use outside the owning module's forward (found by the parameter-use mode): a *soft* pin, held
  until the next module boundary, and released first if every block is pinned;
- backward, saved tensors: the chunks unpacked by the autograd node now running, until another
  node unpacks (the node's views must stay valid while it computes);
- backward, recomputation (activation checkpointing): the recomputed tensors are views of the
  chunk that the region's backward uses later, so the chunk stays pinned until its gradients are
  complete, or the next region's recomputation starts (autograd runs the later region's nodes
  first: they have higher sequence numbers), or the backward ends.
"""

from __future__ import annotations

import time
import warnings

import torch

from elixir import accel, comm
from elixir.memory import BlockCache, Chunk, ChunkGroup, ChunkState, EvictionSchedule, MemoryTracker
from elixir.runtime.grads import GradReducer


class CacheTooSmallError(RuntimeError):
    """Every cache block holds a chunk that is in use."""


class Runtime:
    """Chunks and their movement between tiers and the cache. One per wrapped model."""

    # what `stats` reports (elixir.memory_stats), also of a model not planned yet (all zero)
    STAT_KEYS = (
        "device_bytes", "device_bytes_peak", "host_bytes", "host_bytes_peak", "gathers", "fetch_bytes", "fetch_wait_s",
        "evictions",
        "num_chunks", "cache_blocks", "cache_bytes", "cache_blocks_used", "cache_blocks_used_peak",
        "left_profiled_order", "grad_buffer_bytes", "host_grad_bytes", "disk_bytes", "disk_reads", "disk_writes",
        "disk_bytes_read", "disk_bytes_written",
    )

    def __init__(
        self,
        chunks: list[Chunk],
        cache: BlockCache | None,
        tracker: MemoryTracker,
        device: torch.device,
        *,
        prefetch_depth: int,
        world: ChunkGroup | None = None,
        disk=None,
    ) -> None:
        self.chunks = chunks
        # every rank of the run, over which the optimizer decides (chunks may shard over smaller groups)
        self.world = world if world is not None else chunks[0].group
        self.cache = cache
        self.tracker = tracker
        self.device = device
        self.prefetch_depth = prefetch_depth
        self.schedule = EvictionSchedule()
        self._blocks = _Blocks(self)  # the cache as the schedule's prefetch sees it
        self.gathers = 0
        self.fetch_bytes = 0  # bytes of this rank's shards copied into cache blocks (the all-gathers bring the rest)
        self.fetch_wait_s = 0.0  # host time in fetches a use waited for (see `acquire`)
        self.blocks_used_peak = 0
        self.evictions = 0
        self._clock = 0
        self._soft_pins: list[Chunk] = []
        self._node_pins: list[Chunk] = []
        self._node = None
        self._recompute_pins: set[Chunk] = set()
        self._overflow_reported = False  # the cache grew for a recomputed region (see _free_block)
        self._counted_once = False  # the first backward has learned each chunk's gradient count
        self._recompute_node = None
        self.in_backward = False
        # cache block index -> the peers' reads of this rank's slice of it, still in flight
        # ([Note: shared memory between ranks])
        self._block_read: dict[int, comm.Pending] = {}
        self.grads = GradReducer(chunks, tracker, device, on_reduce=self.release_recompute_pin)
        # [Note: copies beside compute] (accel.py): None on the CPU
        self.copy_stream = accel.copy_stream(device)
        self.host_sync = accel.pinned_host(device) and any(
            c.param_home == "host" or c.optim_home in ("host", "disk") for c in chunks
        )
        # [Note: casts beside the copy] (accel.py): a device staging buffer per stream that casts across
        # tiers run on, allocated once; none on the CPU, where the cast is the copy
        self._cast_staging: dict[object, torch.Tensor] = {}
        if device.type == "cuda":
            numel, owners = cast_staging(chunks)
            for owner in owners:
                stream = {"main": None, "copy": self.copy_stream}.get(owner, owner)
                self._cast_staging[stream] = tracker.empty(numel, torch.float32, "device")
        self.disk = disk  # the scratch file of chunks with optim_home="disk" (elixir/memory/disk.py)

    # --- fetching ----------------------------------------------------------------------------

    def acquire(self, chunk: Chunk) -> None:
        """Make `chunk` gathered (a use now); the caller pins it if it must stay."""
        self._clock += 1
        chunk.last_use = self._clock
        moved = self.schedule.use(chunk.index)
        if chunk.state is not ChunkState.GATHERED or chunk.pending is not None:
            # Time the use waits for its chunk: a gather on demand, or the end of a prefetch. On the host's
            # clock: under CUDA a wait for a prefetch is queued on the compute stream, so a GPU that idles
            # behind it is not counted here (it shows in the step time against the predicted compute).
            t = time.perf_counter()
            if chunk.state is not ChunkState.GATHERED:
                self._gather(chunk, self._free_block(chunk))
            else:
                self._wait_gather(chunk)
            self.fetch_wait_s += time.perf_counter() - t
        if moved and self.prefetch_depth and self.schedule.on_order:
            chunk.pins += 1  # the chunk being used now is no prefetch victim
            self._prefetch()
            chunk.pins -= 1

    def pin(self, chunk: Chunk) -> None:
        chunk.pins += 1

    def unpin(self, chunk: Chunk) -> None:
        assert chunk.pins > 0, f"chunk {chunk.index} unpinned more often than pinned"
        chunk.pins -= 1

    def soft_pin(self, chunk: Chunk) -> None:
        chunk.pins += 1
        self._soft_pins.append(chunk)

    def release_soft_pins(self) -> None:
        for c in self._soft_pins:
            c.pins -= 1
        self._soft_pins.clear()

    def new_node(self, node) -> None:
        """The autograd node `node` runs now: the previous node's views are no longer used."""
        if node is not self._node:
            self.release_node_pins()
            self._node = node

    def node_pin(self, chunk: Chunk, node) -> None:
        """Pin for the autograd node now running; releases the previous node's pins."""
        self.new_node(node)
        chunk.pins += 1
        self._node_pins.append(chunk)

    def release_node_pins(self) -> None:
        for c in self._node_pins:
            c.pins -= 1
        self._node_pins.clear()
        self._node = None

    def start_recompute(self, node) -> None:
        """A recomputation runs inside the unpacking of `node`'s saved tensors. A new node means a
        new checkpointed region: the previous region's backward, which used its recomputed views,
        has run (see [Note: pins])."""
        if node is not self._recompute_node:
            self.release_recompute_pins()
            self._recompute_node = node

    def recompute_pin(self, chunk: Chunk) -> None:
        if chunk not in self._recompute_pins:
            chunk.pins += 1
            self._recompute_pins.add(chunk)

    def release_recompute_pins(self) -> None:
        for c in list(self._recompute_pins):
            self.release_recompute_pin(c)

    def release_recompute_pin(self, chunk: Chunk) -> None:
        if chunk in self._recompute_pins:
            self._recompute_pins.discard(chunk)
            chunk.pins -= 1

    def _wait_gather(self, chunk: Chunk) -> None:
        pending, chunk.pending = chunk.pending, None
        pending.wait()
        trailing = getattr(pending, "trailing", None)
        if trailing is not None:  # the peers may still read this rank's slice of the block
            self._block_read[chunk.block.index] = trailing

    def _gather(self, chunk: Chunk, block, *, prefetch: bool = False) -> None:
        if self.grads.speculation is not None:
            self.grads.speculation.before_fetch(chunk)
        peers_reading = self._block_read.pop(block.index, None)
        if peers_reading is not None:  # before this rank writes its slice of the block again
            peers_reading.wait()
        block.chunk, chunk.block = chunk, block
        full = block.buffer[: chunk.numel]
        what = f"all-gather of chunk {chunk.index}"
        if prefetch and self.copy_stream is not None:
            # on the side stream, after the compute stream's last reads of the block (its previous chunk)
            stream = self.copy_stream
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._shard_into(full[chunk.shard_slice], chunk, stream)
                gather = comm.all_gather(full, full[chunk.shard_slice], chunk.group, what=what, async_op=True,
                                         arena=self.tracker.shared)
            chunk.pending = accel.StreamPending(stream, gather, self.device)
        else:
            self._shard_into(full[chunk.shard_slice], chunk)
            # a prefetch leaves its all-gather in flight; the first use waits for it (see acquire)
            chunk.pending = comm.all_gather(
                full, full[chunk.shard_slice], chunk.group, what=what, async_op=prefetch, arena=self.tracker.shared,
                defer_done=True,
            )
        chunk.bind(full, block)
        self.gathers += 1
        self.fetch_bytes += chunk.shard_numel * chunk.dtype.itemsize
        self.blocks_used_peak = max(self.blocks_used_peak, self.cache.num_used)

    def _shard_into(self, dst: torch.Tensor, chunk: Chunk, stream=None) -> None:
        """This rank's shard of `chunk` into `dst`: from the stored shard, or cast from the master when the
        shard is derived from it (see [Note: host bytes per parameter] in wrap.py)."""
        src = chunk.shard if chunk.shard is not None else chunk.master
        accel.copy_cast_(dst, src, self._cast_staging.get(stream))

    def copy_between(self, dst: torch.Tensor, src: torch.Tensor, *, staging=None) -> None:
        """Copy (and cast) between tiers on the current stream, e.g. an updated master into its shard.
        `staging`: whose device staging buffer to use ("worker": the optimizer's worker thread)."""
        accel.copy_cast_(dst, src, self._cast_staging.get(staging))

    def evict(self, chunk: Chunk) -> None:
        if chunk.pending is not None:
            self._wait_gather(chunk)  # the block is still being written
        block = chunk.block
        block.chunk = None
        chunk.unbind()
        self.cache.give_back(block)
        self.evictions += 1

    def wait_pending(self) -> None:
        """Finish every collective still in flight (prefetches nobody used yet, reductions), so that
        nothing writes into a buffer behind the caller's back, and no work outlives the step."""
        self.grads.finish_reductions()
        for c in self.chunks:
            if c.pending is not None:
                self._wait_gather(c)
        self.grads.wait_peers()
        for peers_reading in self._block_read.values():
            peers_reading.wait()
        self._block_read.clear()
        if self.host_sync:  # asynchronous copies into or out of pinned host memory are done
            accel.synchronize(self.device)

    def evict_all(self) -> None:
        """Drop every gathered on-demand chunk (their shards changed, or the step is over)."""
        if self.cache is None:
            return
        for b in self.cache.occupied():
            assert b.chunk.pins == 0, f"chunk {b.chunk.index} is still in use"
            self.evict(b.chunk)

    def shards_changed(self, chunks: list[Chunk], *, reason: str, write=None) -> None:
        """The shards of `chunks` hold new values (the write-back after a step, `elixir.load`,
        `elixir.load_pretrained`): gather the resident ones again and drop the gathered copies of the
        on-demand ones, so that no gathered copy holds values older than its shard. Other chunks' copies
        stay. All the all-gathers are in flight together; `write(chunk)`, when given, stores a chunk's new
        shard just before its all-gather starts, so that each all-gather runs beside the next chunk's
        write. `reason` names them in a failure ("updated": "all-gather of updated chunk 3"). Returns once
        every all-gather is done and the peers have read this rank's shards, which may change again."""
        gathers = []
        for c in chunks:
            if write is not None:
                write(c)
            if c.resident:
                gathers.append(comm.all_gather(
                    c.full, c.shard, c.group, what=f"all-gather of {reason} chunk {c.index}", async_op=True,
                    arena=self.tracker.shared, defer_done=True,
                ))
        for g in gathers:
            if g is not None:
                g.wait()
        for g in gathers:
            if g is not None and g.trailing is not None:
                g.trailing.wait()
        if self.cache is None:
            return
        changed = {c.index for c in chunks}
        for b in self.cache.occupied():
            if b.chunk.index in changed:
                assert b.chunk.pins == 0, f"chunk {b.chunk.index} is still in use"
                self.evict(b.chunk)

    def _victim(self, candidates: list[Chunk]) -> Chunk:
        chunks = self.chunks
        return chunks[self.schedule.victim([c.index for c in candidates], lambda i: chunks[i].last_use)]

    def _free_block(self, chunk: Chunk):
        block = self.cache.take()
        if block is not None:
            return block
        candidates = [b.chunk for b in self.cache.blocks if b.chunk.pins == 0]
        if not candidates and self._soft_pins:
            self.release_soft_pins()
            candidates = [b.chunk for b in self.cache.blocks if b.chunk.pins == 0]
        if not candidates:
            if self._recompute_pins:
                # activation checkpointing: a recomputed region keeps its chunks gathered until its backward
                # has run, and this region has more than the cache holds. Stopping in the middle of a
                # backward would lose the step; the cache grows by one block instead, for good (memory_stats
                # counts it), and says once what to plan for.
                self.cache.grow()
                if not self._overflow_reported:
                    self._overflow_reported = True
                    warnings.warn(
                        f"activation checkpointing: a recomputed region keeps chunks "
                        f"{sorted(c.index for c in self._recompute_pins)} gathered until its backward has run, "
                        f"more than the plan's {self.cache.planned_blocks} cache blocks hold; the cache grows "
                        f"by a block each time this happens (now {self.cache.num_blocks}); plan with "
                        "cache_blocks >= elixir.memory_stats(model)['cache_blocks'] after a step to keep it "
                        "at that size", stacklevel=2,
                    )
                return self.cache.take()
            raise CacheTooSmallError(
                f"all {self.cache.num_blocks} cache blocks hold chunks in use "
                f"({[b.chunk.index for b in self.cache.blocks]}) while chunk {chunk.index} is needed; "
                f"raise cache_blocks to at least {self.cache.num_blocks + 1}"
            )
        self.evict(self._victim(candidates))
        return self.cache.take()

    def _prefetch(self) -> None:
        self.schedule.prefetch(self._blocks, self.prefetch_depth)

    def enter_backward(self) -> None:
        """Called by every backward-time event; the first one of a backward sets up its end."""
        if self.in_backward:
            return
        self.in_backward = True
        if self.grads.speculation is not None:
            self.grads.speculation.begin_backward()
        self.schedule.saw_backward()
        if not self._counted_once and self.grads.first_backward_counts is None:
            # the first backward learns how many gradients each chunk gets (also when a profiled order
            # drives the schedule): later backwards reduce a chunk only once all have come
            self.grads.first_backward_counts = {}
        torch.autograd.Variable._execution_engine.queue_callback(self.end_backward)

    def end_backward(self, *, abandoned: bool = False) -> None:
        """After the whole backward: reduce what is left, learn the gradient counts, drop pins."""
        spec = self.grads.speculation
        if abandoned and spec is not None:
            spec.end_backward()  # what is left goes into the masters' gradients, not into updates
        self.grads.reduce_leftovers()
        if spec is not None:
            spec.end_backward()
            if abandoned and spec.pending:
                spec.rollback("abandoned", hold=True)
            if not spec.pending:  # the gradients are whole when backward returns: [Note: accumulating on the worker]
                spec.wait_accumulations()
        if abandoned:
            self.grads.first_backward_counts = None  # partial counts: the next backward learns them
        elif not self._counted_once:
            self.grads.learn_counts()
            self._counted_once = True
        if self.host_sync:  # gradients copied into pinned host memory have arrived before the host reads them
            accel.synchronize(self.device)
        if abandoned:
            self.schedule.abandon_backward()
        else:
            self.schedule.end_backward()
        self.release_node_pins()
        self.release_recompute_pins()
        self._recompute_node = None
        self.release_soft_pins()
        self.in_backward = False

    def settle_backward(self) -> None:
        """Finish a backward that raised (a hook, an out-of-memory, a ^C): autograd runs no callback after an
        error, so its end never came. As in PyTorch, the gradients it computed stay (partial: zero_grad drops
        them, step applies them); its pins, its updates inside backward (undone, their gradients held) and
        what it began to learn go. Called where a forward, `zero_grad` or `step` begins: nothing to do
        unless a backward was left unfinished, and never inside one (reentrant checkpointing runs nested
        backwards)."""
        if self.in_backward and torch._C._current_graph_task_id() == -1:
            self.end_backward(abandoned=True)

    def close(self) -> None:
        """Give back what outlives the process's memory: the disk tier's scratch file (it is also deleted
        when the model is garbage-collected, or at exit). The model is unusable afterwards."""
        if self.disk is not None:
            self.disk.close()

    # --- statistics --------------------------------------------------------------------------

    def stats(self) -> dict:
        t = self.tracker
        return {
            "device_bytes": t.bytes["device"],
            "device_bytes_peak": t.bytes_peak["device"],
            "host_bytes": t.bytes["host"],
            "host_bytes_peak": t.bytes_peak["host"],
            "gathers": self.gathers,
            "fetch_bytes": self.fetch_bytes,
            "fetch_wait_s": self.fetch_wait_s,
            "evictions": self.evictions,
            "num_chunks": len(self.chunks),
            "cache_blocks": 0 if self.cache is None else self.cache.num_blocks,
            "cache_bytes": 0 if self.cache is None else sum(b.buffer.nbytes for b in self.cache.blocks),
            "cache_blocks_used": 0 if self.cache is None else self.cache.num_used,
            "cache_blocks_used_peak": self.blocks_used_peak,
            "left_profiled_order": self.schedule.left_order,
            "grad_buffer_bytes": self.grads.grad_buffer_bytes,
            "host_grad_bytes": self.grads.host_grad_bytes,
            "disk_bytes": t.bytes["disk"],
            **(self.disk.stats() if self.disk is not None else
               {"disk_reads": 0, "disk_writes": 0, "disk_bytes_read": 0, "disk_bytes_written": 0}),
        }


class _Blocks:
    """The runtime's block cache as a `CacheView` of the eviction schedule's policy: pins decide what may be
    evicted, and a prefetch gathers asynchronously into a free block."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def is_cached(self, chunk: int) -> bool:
        return self.runtime.chunks[chunk].state is ChunkState.GATHERED

    def has_free_block(self) -> bool:
        cache = self.runtime.cache
        return cache.num_used < cache.num_blocks

    def evictable(self) -> list[int]:
        return [b.chunk.index for b in self.runtime.cache.blocks if b.chunk is not None and b.chunk.pins == 0]

    def last_use(self, chunk: int) -> int:
        return self.runtime.chunks[chunk].last_use

    def evict(self, chunk: int) -> None:
        self.runtime.evict(self.runtime.chunks[chunk])

    def start_prefetch(self, chunk: int) -> None:
        rt = self.runtime
        rt._gather(rt.chunks[chunk], rt.cache.take(), prefetch=True)


def cast_staging(chunks: list[Chunk]) -> tuple[int, tuple[str, ...]]:
    """The fp32 device staging buffers a CUDA runtime holds for casts across tiers ([Note: casts beside the
    copy] in accel.py): (elements of each, whose they are). One for each stream that casts: the compute
    stream ("main") and the copy stream ("copy"); and one of the optimizer's worker thread ("worker") where
    host and disk chunks updated inside backward write their device shards from it (elixir/optim/overlap.py).
    A shard derived from its master is not written there, only cast at each fetch. None without a cast."""
    crossing = [c for c in chunks if _casts_across(c)]
    if not crossing:
        return 0, ()
    worker = any(c.shard is not None and c.optim_home != "device" for c in crossing)
    return max(c.shard_numel for c in crossing), ("main", "copy") + (("worker",) if worker else ())


def _casts_across(chunk: Chunk) -> bool:
    """Whether the chunk's parameter values cross between host and device with a cast: a shard derived
    from a host master, or a master written back into a shard in the other tier."""
    if chunk.master is None or chunk.master.dtype == chunk.dtype:
        return False
    if chunk.shard is None:  # derived from its master, fetched into a device block
        return chunk.optim_home == "host"
    return chunk.param_home != chunk.optim_home
